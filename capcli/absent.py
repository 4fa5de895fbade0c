"""Absent objects: what a photo does not show, so that its captions can be kept from naming it.

A captioner trained on Flickr8k, where three photos in four show people and one in four a dog, puts a man
or a dog into empty kitchens. Two kinds of evidence say that something is not there:

- **people**: ImageNet has no person class, so a logistic probe on the encoder's pooled features is fit on
  the training photos; its target is the share of a photo's captions that name a person (the person words
  of `resources/coco_objects.txt`). People are absent where its probability is below `people_threshold`.
- **the classifier's nouns**: a noun is absent where its summed class probability falls below its floor,
  the 1st percentile of its score over the training photos that at least half of their captions name.
  Only nouns named in at least MIN_PHOTOS training photos get a floor (on Flickr8k: dog, ball, bicycle,
  beach, shirt), since a percentile of a few photos says little. "animal" is one more such noun: its score
  is the summed probability of ImageNet's animal classes, and its words are every animal's, so that a
  model kept from "dog" does not say "wolf" instead.

Both are fit when `capcli train` starts (seconds) and saved in the model dir as ABSENT_FILE.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from capcli.errors import ModelError
from capcli.labels import class_nouns, noun_words, nouns_in, plural, vocabulary
from capcli.objects import categories, objects_in

ABSENT_FILE = "absent.safetensors"  # in a model dir, beside the mapper
PERSON = "person"
WEIGHT_DECAY = 0.03  # the probe's L2 penalty on standardized features, chosen by log-loss on Flickr8k dev
ANIMAL = "animal"
ANIMAL_CLASSES = 398  # ImageNet's classes 0-397 are animals (fish, birds, reptiles, mammals, insects, ...)
AMBIGUOUS_ANIMALS = {"fly", "seal", "shell", "coral"}  # words that name other things at least as often
MIN_PHOTOS = 100  # a noun gets a floor when at least this many training photos show it
FLOOR_QUANTILE = 0.01  # ... at this quantile of its score over those photos


def person_words() -> list[str]:
    """The words that name people, as the object metrics read them, with their plurals."""
    words = categories()[PERSON]
    return list(dict.fromkeys(words + [plural(w) for w in words]))


def person_share(captions: list[str]) -> float:
    """The share of a photo's captions that name a person."""
    return sum(PERSON in objects_in(c) for c in captions) / max(1, len(captions))


def animal_nouns() -> list[str]:
    """The label vocabulary's nouns for animals: those of ImageNet's animal classes."""
    return sorted({noun for noun in class_nouns()[:ANIMAL_CLASSES] if noun} - AMBIGUOUS_ANIMALS)


@functools.lru_cache(maxsize=1)
def compound_nouns() -> tuple[str, ...]:
    """Nouns of more than one word ("hot dog", "teddy bear"), with their plurals: the label vocabulary's and
    the object metrics'."""
    words = [*vocabulary(), *(w for ws in categories().values() for w in ws)]
    return tuple(dict.fromkeys(f for w in words if " " in w for f in (w, plural(w))))


@functools.lru_cache(maxsize=1)
def columns() -> dict[str, int]:
    """The column of each noun of the label vocabulary in noun scores, then of "animal" (with_animal_scores)."""
    return {noun: j for j, noun in enumerate([*vocabulary(), ANIMAL])}


def noun_shares(captions: list[str]) -> torch.Tensor:
    """(V + 1,) the share of a photo's captions that name each noun of the label vocabulary, then any animal."""
    animals = set(animal_nouns())
    shares = torch.zeros(len(columns()))
    for caption in captions:
        nouns = nouns_in(caption)
        for noun in nouns:
            shares[columns()[noun]] += 1 / len(captions)
        shares[columns()[ANIMAL]] += bool(nouns & animals) / len(captions)
    return shares


def with_animal_scores(noun_scores: torch.Tensor) -> torch.Tensor:
    """(B, V) noun scores -> (B, V + 1): the last column is the summed score of the animal nouns."""
    animal = noun_scores[:, [columns()[n] for n in animal_nouns()]].sum(1, keepdim=True)
    return torch.cat([noun_scores, animal], dim=1)


class PeopleProbe(nn.Module):
    """pooled features (B, D) -> probability that the photo shows people (B,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[0], 1)
        with torch.no_grad():
            self.linear.weight.copy_(weight.reshape(1, -1))
            self.linear.bias.copy_(bias.reshape(1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(pooled.float())).squeeze(-1)

    @classmethod
    def fit(cls, pooled: torch.Tensor, shares: torch.Tensor) -> "PeopleProbe | None":
        """Logistic regression of each photo's person share on its standardized features (L-BFGS, full
        batch, deterministic). None when every photo agrees: there is nothing to tell apart."""
        shares = shares.float()
        if shares.min() == shares.max():
            return None
        pooled = pooled.float()
        mean, std = pooled.mean(0), pooled.std(0) + 1e-6
        standard = (pooled - mean) / std
        weight = torch.zeros(pooled.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(standard @ weight + bias, shares)
            loss = loss + WEIGHT_DECAY * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(objective)
        weight, bias = weight.detach(), bias.detach()
        return cls(weight / std, bias - (mean / std) @ weight)  # standardization folded into the weights


class AbsenceCheck:
    """What each photo does not show: people (by the probe) and nouns below their floors (by the classifier)."""

    def __init__(self, people: PeopleProbe | None, floors: dict[str, float]):
        self.people, self.floors = people, floors

    @classmethod
    def fit(cls, pooled: torch.Tensor, noun_scores: torch.Tensor | None, captions: list[list[str]]) -> "AbsenceCheck":
        """From the training photos: pooled features (I, D), the classifier's noun scores (I, V) (None without
        a classification head: no floors), and each photo's captions."""
        people = PeopleProbe.fit(pooled, torch.tensor([person_share(c) for c in captions]))
        floors = {}
        if noun_scores is not None:
            scores = with_animal_scores(noun_scores)  # (I, V + 1)
            shown = torch.stack([noun_shares(c) for c in captions]) >= 0.5  # (I, V + 1)
            for noun, j in columns().items():
                if shown[:, j].sum() >= MIN_PHOTOS:
                    floors[noun] = round(float(torch.quantile(scores[shown[:, j], j], FLOOR_QUANTILE)), 6)
        return cls(people, floors)

    def absent(self, pooled: torch.Tensor, noun_scores: torch.Tensor | None, people_threshold: float) -> list[list[str]]:
        """Per photo, what it does not show: "person", "animal" and nouns of the label vocabulary."""
        rows: list[list[str]] = [[] for _ in range(pooled.shape[0])]
        if self.people is not None:
            for row, p in zip(rows, self.people(pooled).tolist()):
                if p < people_threshold:
                    row.append(PERSON)
        if noun_scores is not None and self.floors:
            scores = with_animal_scores(noun_scores)
            for noun, floor in self.floors.items():
                for row, score in zip(rows, scores[:, columns()[noun]].tolist()):
                    if score < floor:
                        row.append(noun)
        return rows

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def words(thing: str) -> tuple[str, ...]:
        """The words a caption could name it with: the label vocabulary's, and the object metrics' (with
        their plurals) where the noun is also a COCO category ("terrier", "hound" for dog)."""
        if thing == PERSON:
            return tuple(person_words())
        if thing == ANIMAL:
            words = [w for noun in animal_nouns() for w in AbsenceCheck.words(noun)]
            return tuple(dict.fromkeys(words + ["animal", "animals", "creature", "creatures", "pet", "pets"]))
        coco = categories().get(thing, [])
        return tuple(dict.fromkeys(noun_words(thing) + coco + [plural(w) for w in coco]))

    def save(self, path: Path) -> None:
        from safetensors.torch import save as save_safetensors

        from capcli.files import atomic_write_bytes

        state = {}
        if self.people is not None:
            state = {"people.weight": self.people.linear.weight.detach().reshape(-1).contiguous(),
                     "people.bias": self.people.linear.bias.detach().contiguous()}
        atomic_write_bytes(Path(path), save_safetensors(state, metadata={"floors": json.dumps(self.floors)}))

    @classmethod
    def load(cls, path: Path, feature_dim: int) -> "AbsenceCheck":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                floors = json.loads((f.metadata() or {})["floors"])
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path}: not a readable absence check ({type(exc).__name__}: {exc})") from None
        unknown = sorted(set(floors) - set(columns()))
        if unknown:
            raise ModelError(f"{path}: floor for {unknown[0]!r}, a noun this capcli's label vocabulary lacks")
        people = None
        if state:
            weight, bias = state.get("people.weight"), state.get("people.bias")
            if weight is None or bias is None or weight.shape != (feature_dim,) or bias.numel() != 1:
                raise ModelError(f"{path}: the people probe does not fit this model's {feature_dim}-d encoder "
                                 f"features")
            people = PeopleProbe(weight, bias)
        return cls(people, floors)
