"""Object metrics for captions, CHAIR-style (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"):
which of the 80 COCO object categories a caption names, against those its reference captions name.

- CHAIR_s: the share of captions naming at least one object that no reference names;
- CHAIR_i: the share of named objects that no reference names;
- recall: the share of objects named by at least half of an image's references that the caption names.

Each caption's objects are counted once each. The words for each category are package data
(`resources/coco_objects.txt`); a few phrases ("tennis court") are read and not counted.
"""

from __future__ import annotations

import functools
from importlib import resources

from capcli.steering.labels import PhraseMatcher, find_nouns, phrase_table

OBJECTS_FILE = "coco_objects.txt"


@functools.lru_cache(maxsize=1)
def categories() -> dict[str, list[str]]:
    """Category -> its words, in file order ("_ignore" holds phrases that are read and not counted)."""
    text = resources.files("capcli.resources").joinpath(OBJECTS_FILE).read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, words = line.split(":", 1)
            table[name.strip()] = [w.strip() for w in words.split(",") if w.strip()]
    return table


@functools.lru_cache(maxsize=1)
def _matcher() -> PhraseMatcher:
    return PhraseMatcher(phrase_table({(None if k == "_ignore" else k): v for k, v in categories().items()}))


def objects_in(text: str) -> list[str]:
    """The COCO categories a text names, each once, in order of appearance."""
    return list(dict.fromkeys(m.noun for m in _matcher().find(text)))


def object_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict[str, dict]]:
    """Corpus CHAIR_s, CHAIR_i and recall, and per image the objects named wrongly and those missed."""
    named = wrong_total = captions_wrong = salient_total = salient_found = 0
    per_image = {}
    for key, caption in predictions.items():
        counts: dict[str, int] = {}
        for reference in references[key]:
            for category in objects_in(reference):
                counts[category] = counts.get(category, 0) + 1
        said = objects_in(caption)
        wrong = [c for c in said if c not in counts]
        salient = [c for c, n in counts.items() if 2 * n >= len(references[key])]
        missed = [c for c in salient if c not in said]
        named += len(said)
        wrong_total += len(wrong)
        captions_wrong += bool(wrong)
        salient_total += len(salient)
        salient_found += len(salient) - len(missed)
        per_image[key] = {"objects": said, "wrong_objects": wrong, "missed_objects": missed}
    summary = {
        "CHAIR_s": round(captions_wrong / max(1, len(predictions)), 4),
        "CHAIR_i": round(wrong_total / max(1, named), 4),
        "recall": round(salient_found / max(1, salient_total), 4),
        "images": len(predictions), "objects_named": named, "salient_objects": salient_total,
    }
    return summary, per_image


def label_is_named(label: str, references: list[str]) -> bool:
    """True when some reference names the label's noun (or a synonym or plural of it)."""
    return any(m.noun == label for reference in references for m in find_nouns(reference))
