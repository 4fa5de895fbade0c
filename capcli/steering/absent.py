"""Absent objects: what a photo does not show, so that its captions can be kept from naming it.

A captioner trained on Flickr8k, where three photos in four show people and one in four a dog, puts a man
or a dog into empty kitchens. The COCO object detector says what is there: a COCO category it scores below
`absent_below`, and that no label told names, is absent. `--forbid-absent` keeps each absent category's
words out of the captions (capcli.model.pipeline's logits processor).
"""

from __future__ import annotations

import functools

from capcli.steering.labels import plural, vocabulary
from capcli.steering.objects import categories, objects_in


@functools.lru_cache(maxsize=1)
def compound_nouns() -> tuple[str, ...]:
    """Nouns of more than one word ("hot dog", "teddy bear"), with their plurals: the label vocabulary's and
    the object metrics'. They stay allowed where their last word is forbidden."""
    words = [*vocabulary(), *(w for ws in categories().values() for w in ws)]
    return tuple(dict.fromkeys(f for w in words if " " in w for f in (w, plural(w))))


def absent_objects(objects: list, told: list[str], below: float) -> list[str]:
    """The COCO categories a photo does not show, from its detections (capcli.steering.detector.Detection) and the
    labels told."""
    from capcli.steering.detector import class_names

    seen = {d.label for d in objects if d.score >= below} | {c for label in told for c in objects_in(label)}
    return [name for name in class_names().values() if name not in seen]


@functools.lru_cache(maxsize=None)
def absent_words(category: str) -> tuple[str, ...]:
    """The words a caption could name a COCO category with: the object metrics' words and their plurals."""
    words = categories()[category]
    return tuple(dict.fromkeys(words + [plural(w) for w in words]))
