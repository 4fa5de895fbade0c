"""The tests' image encoder: a tiny CNN with fixed-seed random weights, registered as `tiny-random-cnn`.
conftest.py names this module in CAPCLI_PLUGINS, so that capcli finds it in every process a test starts."""

import torch
from torch import nn

from capcli.model.encoders import ImageEncoder, register_encoder

NAME = "tiny-random-cnn"


@register_encoder(NAME)
def tiny_random_cnn(weights=None) -> ImageEncoder:
    """Fixed-seed random weights: the same features in every process, so tests can reload models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
        )
        head = nn.Linear(32, 1000)
    return ImageEncoder(NAME, f"{NAME}@seed0", trunk, 32, mean=(0.5,) * 3, std=(0.5,) * 3, head=head)
