"""Retrieval memory: images (as the encoder's pooled features) with their captions, searched by cosine similarity.

A memory dir holds `features.safetensors` (float16, one L2-normalised row per image) and `memory.json` (the
encoder id, image ids and their captions). Captioning with a memory decodes several candidates and keeps the
one its nearest images' captions agree with most (consensus reranking, as in Devlin et al. 2015, "Exploring
Nearest Neighbor Approaches for Image Captioning"), scored by CIDEr-D with document frequencies from the
memory's captions. Search is exact (one matrix product), which stays fast up to a few hundred thousand
images; beyond that an approximate index (FAISS, hnswlib) would be needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capcli.errors import ModelError
from capcli.files import atomic_write_bytes, atomic_write_text
from capcli.steering.cider import CiderD

FEATURES_FILE = "features.safetensors"
INDEX_FILE = "memory.json"
FORMAT_VERSION = 1


def image_ids(images: list[Path], data: Path) -> list[str]:
    """Images' ids in a memory: their paths relative to the data set's folder (or the folder of its file)."""
    root = data if data.is_dir() else data.parent
    return [Path(os.path.relpath(p, root)).as_posix() for p in images]


@dataclass
class Neighbour:
    image: str  # the image's id in its memory (its path relative to the data set)
    similarity: float
    captions: list[str]


@dataclass
class Memory:
    encoder_id: str
    images: list[str]
    captions: list[list[str]]
    features: torch.Tensor  # (N, D), L2-normalised
    source: str = ""  # where it was loaded from, for messages
    _cider: CiderD | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_features(cls, encoder_id: str, images: list[str], captions: list[list[str]],
                      pooled: torch.Tensor) -> "Memory":
        features = torch.nn.functional.normalize(pooled.float(), dim=1).half()
        return cls(encoder_id, list(images), [list(c) for c in captions], features)

    def save(self, folder: Path, meta: dict | None = None) -> None:
        from safetensors.torch import save

        folder = Path(folder)
        atomic_write_bytes(folder / FEATURES_FILE, save({"features": self.features.half().contiguous()},
                                                        metadata={"encoder_id": self.encoder_id}))
        index = {"format_version": FORMAT_VERSION, "encoder_id": self.encoder_id, **(meta or {}),
                 "images": self.images, "captions": self.captions}
        atomic_write_text(folder / INDEX_FILE, json.dumps(index, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Memory":
        """Read a memory dir; a missing, empty or inconsistent one is a ModelError naming it."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"{folder}: memory dir not found (make one with `capcli memory build`)")
        try:
            index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
            with safe_open(str(folder / FEATURES_FILE), framework="pt") as f:
                features = f.get_tensor("features")
        except FileNotFoundError as exc:
            raise ModelError(f"{folder}: not a memory dir ({Path(exc.filename).name} is missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
            raise ModelError(f"{folder}: memory files are unreadable ({exc})") from None
        if index.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{folder}: memory format version {index.get('format_version')!r}; this capcli reads "
                             f"{FORMAT_VERSION}")
        images, captions = index.get("images", []), index.get("captions", [])
        if not images:
            raise ModelError(f"{folder}: the memory is empty")
        if not (len(images) == len(captions) == features.shape[0]) or features.dim() != 2:
            raise ModelError(f"{folder}: memory files disagree ({len(images)} images, {len(captions)} caption lists, "
                             f"{features.shape[0]} feature rows); build it again")
        return cls(index["encoder_id"], images, captions, features, str(folder))

    @staticmethod
    def combine(memories: list["Memory"]) -> "Memory":
        """One memory holding all of them (they must share an encoder)."""
        first = memories[0]
        for other in memories[1:]:
            first.check_encoder(other.encoder_id, other.source)
        return Memory(first.encoder_id, [i for m in memories for i in m.images],
                      [c for m in memories for c in m.captions], torch.cat([m.features for m in memories]),
                      " + ".join(m.source for m in memories))

    def check_encoder(self, encoder_id: str, user: str) -> None:
        if encoder_id != self.encoder_id:
            raise ModelError(f"memory {self.source or '(new)'} was built with encoder {self.encoder_id}, but {user} "
                             f"uses {encoder_id}; build the memory with that model (capcli memory build --model)")

    def nearest(self, pooled: torch.Tensor, k: int) -> list[list[Neighbour]]:
        """The k most similar images of the memory to each row of pooled (B, D), most similar first."""
        query = torch.nn.functional.normalize(pooled.float().cpu(), dim=1)
        similarity = query @ self.features.float().T  # (B, N)
        scores, rows = similarity.topk(min(k, len(self)), dim=1)
        return [[Neighbour(self.images[j], round(float(s), 4), self.captions[j]) for s, j in zip(ss.tolist(), jj.tolist())]
                for ss, jj in zip(scores, rows)]

    def ranked(self, candidates: list[str], neighbours: list[Neighbour]) -> list[str]:
        """The distinct candidates, the one the neighbours' captions agree with most first (ties: input order)."""
        distinct = list(dict.fromkeys(candidates))
        votes = self.consensus(distinct, neighbours)
        return [c for _, c in sorted(zip(votes, distinct), key=lambda pair: -pair[0])]

    def consensus(self, candidates: list[str], neighbours: list[Neighbour]) -> list[float]:
        """Each candidate's CIDEr-D against the neighbours' captions: how much they agree with it."""
        references = self.cider().prepare([c for n in neighbours for c in n.captions])
        return [self.cider().score(candidate, references) for candidate in candidates]

    def cider(self) -> CiderD:
        """CIDEr-D with document frequencies over the memory's caption sets (computed once)."""
        if self._cider is None:
            self._cider = CiderD(self.captions)
        return self._cider
