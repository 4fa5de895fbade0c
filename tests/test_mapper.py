"""The prefix mapper: pooled features in, P embeddings of the LM's width out."""

import torch

from capcli.model.mapper import MLPMapper


def test_the_mapper_turns_pooled_features_into_prefix_embeddings():
    assert MLPMapper(32, 24, 5, 16)(torch.randn(3, 32)).shape == (3, 5, 24)
