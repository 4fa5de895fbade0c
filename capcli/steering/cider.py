"""CIDEr-D (Vedantam et al. 2015, the variant of the COCO evaluation code), for scoring many captions fast:
the retrieval memory's consensus vote and self-critical training's reward. Document frequencies come from a
corpus of reference sets (one set per image); tests check the scores against pycocoevalcap."""

from __future__ import annotations

import math
from collections import Counter

from capcli.text import python_tokenize

N = 4  # n-grams of 1 to N words
SIGMA = 6.0  # the length penalty's width, in words


class CiderD:
    """CIDEr-D with the document frequencies of `corpus` (an iterable of reference sets, one per image)."""

    def __init__(self, corpus):
        self.document_frequency: Counter = Counter()
        self.documents = 0
        for references in corpus:
            self.document_frequency.update({g for caption in references for g in ngrams(caption)})
            self.documents += 1
        self._log_documents = math.log(max(self.documents, 1))

    def prepare(self, references: list[str]) -> list[tuple[list[dict], int]]:
        """References as tf-idf vectors with their lengths, to score many candidates against."""
        return [self._vector(counts) for counts in map(ngrams, references)]

    def score(self, candidate: str, prepared: list[tuple[list[dict], int]]) -> float:
        """The candidate's CIDEr-D against prepared references (0 when there are none)."""
        if not prepared:
            return 0.0
        vec, length = self._vector(ngrams(candidate))
        return 10.0 * sum(_similarity(vec, length, ref, ref_length) for ref, ref_length in prepared) / len(prepared)

    def _vector(self, counts: Counter) -> tuple[list[dict], int]:
        """Per n, the tf-idf weights of the n-grams; and the length in words."""
        vec: list[dict] = [dict() for _ in range(N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (self._log_documents - math.log(max(self.document_frequency[gram], 1)))
        return vec, sum(v for g, v in counts.items() if len(g) == 1)


def ngrams(text: str) -> Counter:
    """The 1- to N-grams of a caption after PTB-style tokenization, with their counts."""
    words = python_tokenize(text).split()
    return Counter(tuple(words[i:i + n]) for n in range(1, N + 1) for i in range(len(words) - n + 1))


def _similarity(vec: list[dict], length: int, ref: list[dict], ref_length: int) -> float:
    """CIDEr-D for one reference: clipped cosine per n, averaged over n, with the length penalty."""
    total = 0.0
    for a, b in zip(vec, ref):
        norm_a, norm_b = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
        if norm_a and norm_b:
            total += sum(min(v, b[g]) * b[g] for g, v in a.items() if g in b) / (norm_a * norm_b)
    return total / N * math.exp(-((length - ref_length) ** 2) / (2 * SIGMA ** 2))
