"""Prefix mappers: the only trained part. They turn image features into P embeddings of the LM's width E."""

from __future__ import annotations

import torch
from torch import nn

from capcli.config import ModelConfig


class FeatureNorm(nn.Module):
    """Standardizes features with statistics of the training set (set once by fit(), saved with the weights).
    CNN features are small and lopsided (post-ReLU); standardized inputs train much faster."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        flat = features.reshape(-1, features.shape[-1]).float()  # (B, D) or (B * N, D)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp(min=1e-6) if flat.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class MLPMapper(nn.Module):
    """ClipCap's MLP: pooled features (B, D) -> (B, P, E)."""

    def __init__(self, feature_dim: int, lm_width: int, prefix_length: int, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.norm = FeatureNorm(feature_dim)
        self.prefix_length, self.lm_width = prefix_length, lm_width
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden_size),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, prefix_length * lm_width),
        )

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(pooled)).view(-1, self.prefix_length, self.lm_width)  # (B, P, E)


class TransformerMapper(nn.Module):
    """P learned queries attend to the grid tokens (B, N, D) through a small transformer decoder
    (ClipCap's transformer mapper, in the shape of a Q-Former) -> (B, P, E)."""

    def __init__(self, feature_dim: int, num_tokens: int, lm_width: int, prefix_length: int, hidden_size: int,
                 num_layers: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm = FeatureNorm(feature_dim)
        self.project_in = nn.Linear(feature_dim, hidden_size)
        self.token_position = nn.Parameter(torch.randn(1, num_tokens, hidden_size) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, prefix_length, hidden_size) * 0.02)
        layer = nn.TransformerDecoderLayer(hidden_size, num_heads, dim_feedforward=4 * hidden_size, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(hidden_size))
        self.project_out = nn.Linear(hidden_size, lm_width)

    @property
    def output_layer(self) -> nn.Linear:
        return self.project_out

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        memory = self.project_in(self.norm(grid)) + self.token_position  # (B, N, H)
        queries = self.queries.expand(grid.shape[0], -1, -1)  # (B, P, H)
        return self.project_out(self.decoder(queries, memory))  # (B, P, E)


def build_mapper(config: ModelConfig) -> nn.Module:
    if config.mapper == "mlp":
        return MLPMapper(config.feature_dim, config.lm_width, config.prefix_length, config.hidden_size, config.dropout)
    return TransformerMapper(config.feature_dim, config.num_tokens, config.lm_width, config.prefix_length,
                             config.hidden_size, config.num_layers, config.num_heads, config.dropout)


@torch.no_grad()
def initialize_from_data(mapper: nn.Module, features: torch.Tensor, embedding_std: float) -> None:
    """Data-dependent start: standardize the inputs with the training set's statistics, and scale the output
    layer so the first prefixes are as large as the LM's own token embeddings (far larger ones swamp the LM)."""
    mapper.norm.fit(features)
    sample = features[torch.randperm(features.shape[0])[:256]].float()
    prefix_std = mapper(sample).std().item()
    if prefix_std > 0:
        mapper.output_layer.weight.mul_(embedding_std / prefix_std)
        mapper.output_layer.bias.mul_(embedding_std / prefix_std)
