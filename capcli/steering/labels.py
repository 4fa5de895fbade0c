"""What the encoder sees, as everyday nouns: its ImageNet head's class probabilities summed per noun, and the
same nouns found in caption text (for grounded training and word swaps).

The class -> noun map is package data (`resources/imagenet_nouns.tsv`), written by hand: all dog breeds are
"dog", tabby / tiger cat / Persian / Siamese / Egyptian cat are "cat", missile and space shuttle are "rocket",
and classes with no everyday noun (or an ambiguous one, such as the "crane" that fires on airliners) are empty.
"""

from __future__ import annotations

import csv
import functools
import random
import re
from dataclasses import dataclass
from importlib import resources

NOUN_MAP = "imagenet_nouns.tsv"
NUM_CLASSES = 1000

# Other words a caption may use for a noun of the map (plurals are derived, irregular ones listed).
SYNONYMS = {
    "dog": ["puppy", "puppies", "doggy", "pup"], "cat": ["kitten", "kitty", "kitties"],
    "bicycle": ["bike", "bikes", "cycle"], "airplane": ["plane", "planes", "jet", "jets", "aircraft", "airliner"],
    "car": ["automobile"], "phone": ["cellphone", "telephone"], "television": ["tv", "tvs"],
    "sheep": ["lamb", "lambs"], "horse": ["pony", "ponies", "foal"], "cow": ["cattle", "calf", "calves", "bull", "bulls"],
    "boat": ["kayak", "kayaks", "raft", "rafts"], "ball": ["football", "soccer ball"], "couch": ["sofa", "sofas"],
    "monkey": ["ape", "apes"], "mouse": ["mice"], "fish": ["fishes"], "rocket": ["missile", "space shuttle"],
    "cup": ["mug", "mugs"], "coffee": ["espresso", "latte", "cappuccino"], "hamburger": ["burger", "burgers"],
    "refrigerator": ["fridge", "fridges"], "laptop": ["notebook computer"], "sunglasses": ["shades"],
    "goose": ["geese"], "ox": ["oxen"], "knife": ["knives"], "shoe": ["sneaker", "sneakers"],
    "potatoes": ["potato"], "bubbles": ["bubble"], "stones": ["stone", "rocks"],
    "jeans": ["jean"], "skis": ["ski"], "socks": ["sock"], "gloves": ["glove"], "tools": ["tool"],
}
# Nouns of one kind, swapped for each other in training so that the model learns to follow the labels.
SWAP_GROUPS = [
    ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "bear", "elephant", "zebra", "lion", "tiger", "monkey",
     "rabbit", "fox", "wolf", "deer", "camel", "bird", "duck", "chicken"],
    ["ball", "basketball", "baseball", "volleyball", "tennis ball", "golf ball"],
    ["car", "truck", "bus", "van", "jeep", "tractor", "train", "boat", "bicycle", "scooter"],
    ["hat", "helmet", "cap"],
    ["shirt", "sweater", "coat", "jacket", "dress", "sweatshirt"],
    ["beach", "lake", "mountain", "cliff"],
    ["pizza", "hamburger", "hot dog", "sandwich", "bread", "cake", "banana", "apple", "orange", "broccoli"],
    ["cup", "bottle", "bowl", "plate", "glass"],
    ["chair", "bench", "couch", "table", "bed"],
    ["guitar", "violin", "drum", "piano", "microphone"],
]
IRREGULAR_PLURALS = {"sheep": "sheep", "fish": "fish", "mouse": "mice", "goose": "geese", "ox": "oxen",
                     "knife": "knives", "deer": "deer", "bison": "bison", "buffalo": "buffalo"}
WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")


@functools.lru_cache(maxsize=1)
def class_nouns() -> tuple[str | None, ...]:
    """The everyday noun of each ImageNet class (index order), or None where there is none."""
    text = resources.files("capcli.resources").joinpath(NOUN_MAP).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    nouns = tuple(row["noun"] or None for row in sorted(rows, key=lambda r: int(r["index"])))
    assert len(nouns) == NUM_CLASSES, f"{NOUN_MAP} must have one row per ImageNet class"
    return nouns


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every noun a label can be, sorted."""
    return tuple(sorted({n for n in class_nouns() if n}))


def plural(noun: str) -> str:
    *head, last = noun.split(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


@dataclass(frozen=True)
class Mention:
    """A noun of the vocabulary found in a text: characters start:end, in the plural or not."""

    noun: str
    start: int
    end: int
    plural: bool


class PhraseMatcher:
    """Finds phrases of a table (word sequence -> (value, is plural)) in text, longest first, left to right."""

    def __init__(self, table: dict[tuple[str, ...], tuple[str | None, bool]]):
        self.table = table
        self.longest = max(len(k) for k in table)

    def find(self, text: str) -> list[Mention]:
        words = [(m.group(), m.start(), m.end()) for m in WORD.finditer(text.lower())]
        found, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                key = tuple(w for w, _, _ in words[i: i + n])
                if key in self.table:
                    value, is_plural = self.table[key]
                    if value is not None:  # None: a phrase consumed but not counted ("tennis court")
                        found.append(Mention(value, words[i][1], words[i + n - 1][2], is_plural))
                    i += n
                    break
            else:
                i += 1
        return found


def phrase_table(words_by_value: dict[str | None, list[str]]) -> dict[tuple[str, ...], tuple[str | None, bool]]:
    """Each listed word or phrase, and its derived plural, -> (value, is plural); words listed first win.
    A listed word other than the value itself that ends in s counts as a plural ("puppies" of "dog")."""
    table: dict[tuple[str, ...], tuple[str | None, bool]] = {}
    for value, words in words_by_value.items():
        for word in words:
            listed_plural = word != value and word.endswith("s") and not (value or "").endswith("s")
            table.setdefault(tuple(word.split()), (value, listed_plural))
    for value, words in words_by_value.items():
        for word in words:
            table.setdefault(tuple(plural(word).split()), (value, True))
    return table


def noun_words(noun: str) -> list[str]:
    """The words a caption may name a noun of the vocabulary with: itself, its synonyms, and their plurals."""
    words = [noun, *SYNONYMS.get(noun, [])]
    return list(dict.fromkeys(words + [plural(w) for w in words]))


@functools.lru_cache(maxsize=1)
def _noun_matcher() -> PhraseMatcher:
    words = {noun: [noun] for noun in vocabulary()}
    for noun, synonyms in SYNONYMS.items():
        if noun in words:
            words[noun] += synonyms
    return PhraseMatcher(phrase_table(words))


def find_nouns(text: str) -> list[Mention]:
    """The vocabulary's nouns in `text`, longest phrase first ("hot dog" is not a dog), in order."""
    return _noun_matcher().find(text)


def nouns_in(text: str) -> set[str]:
    """The vocabulary's nouns that `text` names (plurals and synonyms count: "espresso" names coffee)."""
    return {m.noun for m in find_nouns(text)}


@functools.lru_cache(maxsize=1)
def _swap_partners() -> dict[str, list[str]]:
    vocab = set(vocabulary())
    partners: dict[str, list[str]] = {}
    for group in SWAP_GROUPS:
        members = [g for g in group if g in vocab]
        for noun in members:
            partners[noun] = [m for m in members if m != noun]
    return partners


def swap_noun(caption: str, mentions: list[Mention], rng: random.Random) -> tuple[str, dict[str, str]]:
    """Replace every mention of one swappable noun by another noun of its kind (dog -> cat, both in the
    singular or plural as written, with "a"/"an" fixed). Returns the caption and {old: new} (empty if none)."""
    swappable = [m.noun for m in mentions if _swap_partners().get(m.noun)]
    if not swappable:
        return caption, {}
    old = rng.choice(sorted(set(swappable)))
    new = rng.choice(_swap_partners()[old])
    pieces, last = [], 0
    for m in mentions:
        if m.noun != old:
            continue
        before = caption[last: m.start]
        replacement = plural(new) if m.plural else new
        article = re.search(r"\b(a|an|A|An)\s+$", before)
        if article and not m.plural:
            word = ("an" if new[0] in "aeiou" else "a")
            word = word.capitalize() if article.group(1)[0] == "A" else word
            before = before[: article.start(1)] + word + before[article.end(1):]
        pieces += [before, replacement]
        last = m.end
    pieces.append(caption[last:])
    return "".join(pieces), {old: new}


def label_matrix():
    """(NUM_CLASSES, V) 0/1 matrix: class i counts towards noun j. Probabilities @ matrix = noun scores."""
    import torch

    vocab = {noun: j for j, noun in enumerate(vocabulary())}
    matrix = torch.zeros(NUM_CLASSES, len(vocab))
    for i, noun in enumerate(class_nouns()):
        if noun:
            matrix[i, vocab[noun]] = 1.0
    return matrix


class Labeler:
    """Class logits (B, 1000) -> the top nouns with their summed probabilities, best first."""

    def __init__(self, top: int = 5, min_score: float = 0.05):
        self.matrix = label_matrix()
        self.nouns = vocabulary()
        self.top, self.min_score = top, min_score

    def scores(self, logits):
        """(B, V): each noun's summed class probability."""
        return logits.float().softmax(-1) @ self.matrix.to(logits.device)

    def __call__(self, logits) -> list[list[tuple[str, float]]]:
        scores = self.scores(logits)  # (B, V)
        values, indices = scores.topk(min(self.top, scores.shape[1]), dim=-1)
        return [[(self.nouns[j], round(float(v), 4)) for v, j in zip(vs.tolist(), js.tolist()) if v >= self.min_score]
                for vs, js in zip(values, indices)]
