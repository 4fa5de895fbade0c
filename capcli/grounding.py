"""Grounded captioning's inputs: what a grounded model is told about an image, in training and when captioning.

When captioning, the labels are the encoder classifier's confident nouns. In training they are the caption's
own nouns (as ViECap does), some dropped and some swapped for another noun of the same kind in both the labels
and the caption (word-swap training, as in PS-NOC), so the model learns to follow the labels.
"""

from __future__ import annotations

import random

import torch

from capcli.config import GroundingConfig


def confident(labels: list[tuple[str, float]], grounding: GroundingConfig) -> list[str]:
    """The nouns a grounded model is told: those scoring at least the threshold, best first, at most max_labels."""
    return [noun for noun, score in labels if score >= grounding.threshold][: grounding.max_labels]


@torch.no_grad()
def classifier_labels(encoder, pooled: torch.Tensor, grounding: GroundingConfig) -> list[list[str]]:
    """Pooled features (I, D) -> each image's confident labels, as captioning computes them."""
    from capcli.labels import Labeler

    labeler = Labeler()
    return [confident(row, grounding) for chunk in pooled.split(1024) for row in labeler(encoder.classify(chunk).cpu())]


def training_example(caption: str, grounding: GroundingConfig, rng: random.Random) -> tuple[list[str], str]:
    """(labels, caption) for one training caption: its own nouns, each dropped with probability `drop`; with
    probability `swap`, one noun replaced by another of its kind in both the labels and the caption."""
    from capcli.labels import find_nouns, swap_noun

    mentions = find_nouns(caption)
    if mentions and rng.random() < grounding.swap:
        caption, swapped = swap_noun(caption, mentions, rng)
        if swapped:
            mentions = find_nouns(caption)
    nouns = list(dict.fromkeys(m.noun for m in mentions))
    return [n for n in nouns if rng.random() >= grounding.drop], caption
