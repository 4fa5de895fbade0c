"""Prefix mappers: the only trained part. They turn image features into P embeddings of the LM's width E."""

from __future__ import annotations

import torch
from torch import nn

from capcli.config import ModelConfig


class FeatureNorm(nn.Module):
    """Divides features by their root-mean-square over the training set (set once by fit(), saved with the
    weights), so the mapper sees inputs of about unit size from any encoder. Deliberately not centred:
    the shared component of uncentred features gives every image a similar first prefix, from which
    training quickly learns a generic caption, then the differences (centring slowed early training
    several-fold on Flickr8k)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        # in chunks: a float32 copy of a whole grid-token cache would take gigabytes
        squares = sum(chunk.float().pow(2).sum().item() for chunk in features.split(256))
        rms = (squares / max(1, features.numel())) ** 0.5
        self.scale.fill_(1.0 / rms if rms > 0 else 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.scale


class MLPMapper(nn.Module):
    """ClipCap's MLP: pooled features (B, D) -> (B, P, E)."""

    def __init__(self, feature_dim: int, lm_width: int, prefix_length: int, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.norm = FeatureNorm()
        self.prefix_length, self.lm_width = prefix_length, lm_width
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden_size),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, prefix_length * lm_width),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(pooled)).view(-1, self.prefix_length, self.lm_width)  # (B, P, E)


class TransformerMapper(nn.Module):
    """P learned queries attend to the grid tokens (B, N, D) through a small transformer decoder
    (ClipCap's transformer mapper, in the shape of a Q-Former) -> (B, P, E)."""

    def __init__(self, feature_dim: int, num_tokens: int, lm_width: int, prefix_length: int, hidden_size: int,
                 num_layers: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm = FeatureNorm()
        self.project_in = nn.Linear(feature_dim, hidden_size)
        self.token_position = nn.Parameter(torch.randn(1, num_tokens, hidden_size) * 0.02)
        # Unit-scale queries: with the usual 0.02 the residual stream is swamped by the (at first uniform)
        # attention output, all P prefix positions start out nearly equal, and on Flickr8k the training
        # loss sat near 3.4 for the first 200 steps where the MLP mapper was at 2.7.
        self.queries = nn.Parameter(torch.randn(1, prefix_length, hidden_size))
        layer = nn.TransformerDecoderLayer(hidden_size, num_heads, dim_feedforward=4 * hidden_size, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(hidden_size))
        self.project_out = nn.Linear(hidden_size, lm_width)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        memory = self.project_in(self.norm(grid)) + self.token_position  # (B, N, H)
        queries = self.queries.expand(grid.shape[0], -1, -1)  # (B, P, H)
        return self.project_out(self.decoder(queries, memory))  # (B, P, E)


def build_mapper(config: ModelConfig) -> nn.Module:
    if config.mapper == "mlp":
        return MLPMapper(config.feature_dim, config.lm_width, config.prefix_length, config.hidden_size, config.dropout)
    return TransformerMapper(config.feature_dim, config.num_tokens, config.lm_width, config.prefix_length,
                             config.hidden_size, config.num_layers, config.num_heads, config.dropout)
