"""Prefix mappers: shapes, and a transformer mapper whose prefix positions start out distinct."""

import torch
from torch.nn.functional import normalize

from capcli.mapper import MLPMapper, TransformerMapper


def mean_similarity_between_prefix_positions(prefix: torch.Tensor) -> float:
    unit = normalize(prefix, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (B, P, P)
    positions = similarity.shape[1]
    return ((similarity.sum((1, 2)) - positions) / (positions * (positions - 1))).mean().item()


def test_mappers_turn_features_into_prefix_embeddings():
    assert MLPMapper(32, 24, 5, 16)(torch.randn(3, 32)).shape == (3, 5, 24)
    assert TransformerMapper(32, 9, 24, 5, 16, 1, 2)(torch.randn(3, 9, 32)).shape == (3, 5, 24)


def test_transformer_prefix_positions_differ_at_initialisation():
    # With small (0.02) query embeddings all ten prefix vectors started nearly parallel (cosine 0.98) and
    # training on Flickr8k stalled for hundreds of steps; unit-scale queries start them apart.
    torch.manual_seed(0)
    mapper = TransformerMapper(feature_dim=1280, num_tokens=49, lm_width=576, prefix_length=10, hidden_size=512,
                               num_layers=2, num_heads=8)
    with torch.no_grad():
        prefix = mapper(torch.randn(4, 49, 1280).abs())
    assert mean_similarity_between_prefix_positions(prefix) < 0.5
