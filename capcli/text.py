"""Caption text as people write it: Flickr8k's and COCO's tokenized captions ("A dog runs .") teach the model
a space before punctuation; users keep captions in sidecars and photo metadata for good, so every output is
tidied: no space before punctuation or a clitic, the first letter capital, single spaces. And caption text as
metrics read it (python_tokenize)."""

from __future__ import annotations

import re

SPACE_BEFORE = re.compile(r"\s+([.,!?;:)]|'s\b|'re\b|n't\b|'ll\b|'ve\b|'d\b|'m\b)")
SPACE_AFTER = re.compile(r"([(])\s+")
PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def tidy(caption: str) -> str:
    """"a cat is playing with a toy ." -> "A cat is playing with a toy."; "man 's" -> "man's"."""
    text = " ".join(caption.split())
    text = SPACE_AFTER.sub(r"\1", SPACE_BEFORE.sub(r"\1", text))
    return text[:1].upper() + text[1:]


def python_tokenize(text: str) -> str:
    """The documented fallback tokenizer of the metrics: lower-case, drop punctuation, collapse spaces."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())
