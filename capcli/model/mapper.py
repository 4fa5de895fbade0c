"""The prefix mapper: the only trained part. It turns pooled image features into P embeddings of the LM's width E."""

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


def build_mapper(config: ModelConfig) -> nn.Module:
    return MLPMapper(config.feature_dim, config.lm_width, config.prefix_length, config.hidden_size, config.dropout)
