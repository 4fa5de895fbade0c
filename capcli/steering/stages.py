"""Steering: what is known about each image, and the stages that turn it into the words its captions may use.

The captioner encodes a batch, gathers each image's `ImageFacts` (its pooled features, the classifier's
nouns, the detector's objects), then runs every stage of `STAGES` in order, as transformers runs a
`LogitsProcessorList`. A stage may fill in facts (`prepare`), change the decoding settings (`widen`), add
logits processors (`processors`) and revise the decoded captions (`revise`: retries and rerankers); each
hook does nothing unless the stage overrides it. A new stage is one class and one line:

    @register
    class NoColours(Stage):
        def prepare(self, captioner, facts, settings):
            for image in facts:
                image.banned += ["red", "green", "blue"]

See docs/architecture.md for a whole example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from capcli.config import DecodingSettings
from capcli.errors import ModelError
from capcli.steering.absent import absent_objects, absent_words, compound_nouns
from capcli.steering.grounding import confident

MIN_RETRY_TOKENS = 4  # an empty caption is decoded again with at least this many tokens


@dataclass
class ImageFacts:
    """What is known about one image before its captions are decoded, and what the stages decided."""

    pooled: torch.Tensor  # (D,) the encoder's pooled features
    labels: list[tuple[str, float]] | None = None  # the classifier's nouns with their scores
    objects: list | None = None  # the detector's objects (capcli.steering.detector.Detection)
    told: list[str] | None = None  # the labels a grounded model's prompt names; None: the model reads none
    banned: list[str] = field(default_factory=list)  # words its captions may not contain
    neighbours: list | None = None  # with a memory: the similar images whose captions vote (memory.Neighbour)


Decode = Callable[[list[ImageFacts], DecodingSettings], list[list[str]]]


class Stage:
    """One step of steering; the captioner calls each hook of each stage in the order of STAGES."""

    def prepare(self, captioner, facts: list[ImageFacts], settings: DecodingSettings) -> None:
        """Fill in what this stage knows about each image."""

    def widen(self, captioner, settings: DecodingSettings) -> DecodingSettings:
        """The settings to decode with (a reranker asks for more candidates)."""
        return settings

    def processors(self, captioner, facts: list[ImageFacts], settings: DecodingSettings) -> list:
        """Logits processors for decoding these images (transformers' `LogitsProcessor` protocol)."""
        return []

    def revise(self, captioner, facts: list[ImageFacts], captions: list[list[str]], decoding: DecodingSettings,
               settings: DecodingSettings, decode: Decode) -> list[list[str]]:
        """The captions after this stage: `decode(facts, settings)` decodes some images again."""
        return captions


class PromptLabels(Stage):
    """A grounded model's prompt names what the eyes see: the detector's objects, then the classifier's nouns."""

    def prepare(self, captioner, facts, settings):
        grounding = captioner.model.config.grounding
        if grounding is not None:
            for image in facts:
                image.told = confident(image.labels, grounding, image.objects)


class ForbidAbsent(Stage):
    """--forbid-absent: no words for the COCO categories the detector scores below absent_below and no label
    told names (capcli.steering.absent)."""

    def prepare(self, captioner, facts, settings):
        if not settings.steering.forbid_absent:
            return
        if any(image.objects is None for image in facts):
            raise ModelError("--forbid-absent reads the object detector's objects: load the captioner with "
                             "objects=True (the command line does)")
        for image in facts:
            absent = absent_objects(image.objects, image.told or [], settings.steering.absent_below)
            image.banned += [word for thing in absent for word in absent_words(thing)]


class BanWords(Stage):
    """Each image's banned words (whichever stage banned them) never appear in its captions, lower case or
    capitalized; compound nouns that end in a banned word and name something else ("hot dog") stay allowed."""

    def __init__(self):
        self._word_ids: dict[str, list[list[int]]] = {}  # a word's token ids, lower case and capitalized

    def processors(self, captioner, facts, settings):
        forbidden, allowed = [], []
        for image in facts:
            words = set(image.banned)
            compounds = [c for c in compound_nouns() if c.split()[-1] in words and c not in words]
            forbidden.append(self._tokens(captioner.model, sorted(words)))
            allowed.append(self._tokens(captioner.model, compounds))
        return [ForbiddenWords(forbidden, allowed)] if any(forbidden) else []

    def _tokens(self, model, words: list[str]) -> list[list[int]]:
        for word in words:
            if word not in self._word_ids:
                self._word_ids[word] = model.word_tokens([word])
        return [ids for w in words for ids in self._word_ids[w]]


class RetryEmpty(Stage):
    """Never an empty caption: images whose caption came out empty are decoded again with the end of text
    forbidden for the first few tokens."""

    def revise(self, captioner, facts, captions, decoding, settings, decode):
        empty = [i for i, texts in enumerate(captions) if not all(texts)]
        if not empty:
            return captions
        generation = decoding.generation
        least = min(max(generation.min_new_tokens, MIN_RETRY_TOKENS), generation.max_new_tokens)
        again = decode([facts[i] for i in empty], decoding.updated(min_new_tokens=least))
        for i, texts in zip(empty, again):
            captions[i] = [old or new for old, new in zip(captions[i], texts)]
        return captions


class MemoryVote(Stage):
    """With a memory: decode `candidates` captions per image (beam search's N best, or N samples) and order
    them by how much the nearest images' captions agree with each (CIDEr-D); keep the best `num_captions`."""

    def prepare(self, captioner, facts, settings):
        if captioner.memory is not None:
            pooled = torch.stack([image.pooled for image in facts])
            near = captioner.memory.nearest(pooled, settings.steering.neighbours)
            for image, neighbours in zip(facts, near):
                image.neighbours = neighbours

    def widen(self, captioner, settings):
        if captioner.memory is None:
            return settings
        generation = settings.generation
        wide = max(settings.steering.candidates, generation.num_captions)
        return settings.updated(num_captions=wide,
                                beams=generation.beams if generation.sample else max(generation.beams, wide))

    def revise(self, captioner, facts, captions, decoding, settings, decode):
        if captioner.memory is None:
            return captions
        ranked = [captioner.memory.ranked(candidates, image.neighbours) for candidates, image in zip(captions, facts)]
        keep = settings.generation.num_captions
        return [(order * keep)[:keep] for order in ranked]


STAGES: list[type[Stage]] = [PromptLabels, ForbidAbsent, BanWords, RetryEmpty, MemoryVote]


def register(stage: type[Stage]) -> type[Stage]:
    """Add a stage after the others (a class decorator); captioners loaded afterwards run it."""
    STAGES.append(stage)
    return stage


class ForbiddenWords:
    """A logits processor: per image, token sequences that may not be generated (as transformers'
    `bad_words_ids`, which holds one list for the whole batch): a sequence's last token is forbidden where the
    tokens before it were just generated. `allowed` sequences lift that again for their last token after
    their own first tokens: "hot dog" stays possible where "dog" is forbidden."""

    def __init__(self, forbidden: list[list[list[int]]], allowed: list[list[list[int]]] | None = None):
        self.forbidden = [self._group(sequences) for sequences in forbidden]
        self.allowed = [self._group(sequences) for sequences in (allowed or [[] for _ in forbidden])]

    @staticmethod
    def _group(sequences: list[list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Length of the head (tokens before the last) -> (heads (S, n), last tokens (S,))."""
        by_length: dict[int, list[list[int]]] = {}
        for sequence in sequences:
            by_length.setdefault(len(sequence) - 1, []).append(sequence)
        return {n: (torch.tensor([s[:-1] for s in group], dtype=torch.long).reshape(len(group), n),
                    torch.tensor([s[-1] for s in group], dtype=torch.long)) for n, group in by_length.items()}

    @staticmethod
    def _mark(mask: torch.Tensor, recent: torch.Tensor, groups: dict, value: bool) -> None:
        """Set mask[row, last] = value for each sequence whose head the row's latest tokens match."""
        for n, (heads, lasts) in groups.items():
            lasts = lasts.to(mask.device)
            if n == 0:
                mask[:, lasts] = value
            elif recent.shape[1] >= n:
                hit = (recent[:, -n:][:, None, :] == heads.to(recent.device)[None]).all(-1)  # (R, S)
                rows, which = hit.nonzero(as_tuple=True)
                mask[rows, lasts[which]] = value

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows_per_image = scores.shape[0] // len(self.forbidden)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for image, (forbidden, allowed) in enumerate(zip(self.forbidden, self.allowed)):
            rows = slice(image * rows_per_image, (image + 1) * rows_per_image)
            self._mark(mask[rows], input_ids[rows], forbidden, True)
            self._mark(mask[rows], input_ids[rows], allowed, False)
        return scores.masked_fill(mask, -float("inf"))
