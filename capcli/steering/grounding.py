"""Grounded captioning's inputs: what a grounded model is told about an image, in training and when captioning.

When captioning, the labels are what the two pairs of eyes see: the detector's objects with their counts
("2 people, dog"), then the encoder classifier's confident nouns that name no object already told (cat
breeds become "cat", "espresso" becomes "coffee", "rocket": things COCO lacks). In training they are either
the same machine labels for the training photo, some dropped, or the caption's own nouns (as ViECap does),
some dropped and some swapped for another noun of the same kind in both the labels and the caption
(word-swap training, as in PS-NOC), so the model learns to follow the labels.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from capcli.config import GroundingConfig

# How the prompt names a COCO category where its name is not the everyday word.
OBJECT_NOUNS = {"dining table": "table", "sports ball": "ball", "potted plant": "plant", "cell phone": "phone",
                "tv": "television", "hair drier": "hair dryer"}
MAX_COUNT = 9  # more than this many of one object are told as "many"


def object_phrase(label: str, count: int) -> str:
    """"dog", "2 dogs", "person", "3 people", "many people"."""
    from capcli.steering.labels import plural

    noun = OBJECT_NOUNS.get(label, label)
    if count == 1:
        return noun
    many = "people" if noun == "person" else plural(noun)
    return f"{count if count <= MAX_COUNT else 'many'} {many}"


def confident(labels: list[tuple[str, float]], grounding: GroundingConfig, objects: list | None = None) -> list[str]:
    """The labels a grounded model is told, at most max_labels: the detector's objects whose best detection
    scores at least object_threshold, best first, each with its count of detections scoring at least
    count_threshold (once a category is sure, a less sure second one is most likely another of it); then the
    classifier's nouns scoring at least threshold that name no object already told."""
    from capcli.steering.objects import objects_in

    told, covered = [], set()
    if objects is not None:
        sure = {d.label for d in objects if d.score >= grounding.object_threshold}
        counts = Counter(d.label for d in objects  # best first, as detections come
                         if d.label in sure and d.score >= grounding.count_threshold)
        told = [object_phrase(label, n) for label, n in counts.items()]
        covered = set(counts)
    for noun, score in labels:
        if score >= grounding.threshold and not covered & set(objects_in(noun)):
            told.append(noun)
    return told[: grounding.max_labels]


@torch.no_grad()
def classifier_labels(encoder, pooled: torch.Tensor, grounding: GroundingConfig,
                      objects: list[list] | None = None) -> list[list[str]]:
    """Pooled features (I, D) (and each image's detections) -> each image's labels, as captioning tells them."""
    from capcli.steering.labels import Labeler

    labeler = Labeler()
    rows = [row for chunk in pooled.split(1024) for row in labeler(encoder.classify(chunk).cpu())]
    return [confident(row, grounding, objects[i] if objects is not None else None) for i, row in enumerate(rows)]


def machine_example(labels: list[str], grounding: GroundingConfig, rng: random.Random) -> list[str]:
    """The labels a training photo is told with train_labels "machine": its own, each dropped with `drop`."""
    return [label for label in labels if rng.random() >= grounding.drop]


def training_example(caption: str, grounding: GroundingConfig, rng: random.Random) -> tuple[list[str], str]:
    """(labels, caption) for one training caption: its own nouns, each dropped with probability `drop`; with
    probability `swap`, one noun replaced by another of its kind in both the labels and the caption."""
    from capcli.steering.labels import find_nouns, swap_noun

    mentions = find_nouns(caption)
    if mentions and rng.random() < grounding.swap:
        caption, swapped = swap_noun(caption, mentions, rng)
        if swapped:
            mentions = find_nouns(caption)
    nouns = list(dict.fromkeys(m.noun for m in mentions))
    return [n for n in nouns if rng.random() >= grounding.drop], caption
