"""Split a job's inputs into N parts that every machine computes alike: `--shard I/N`, and the processes
of `torchrun` / `accelerate launch` (RANK of WORLD_SIZE).

An input belongs to part I when a stable hash (sha256) of its key, its path relative to the root the
user gave, falls in part I. So a re-listed or re-ordered folder, or a machine that mounts the same folder
elsewhere, gives the same parts; the parts cover every input exactly once, and their outputs merge by
concatenation.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from capcli.errors import CapcliError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part `index` (from 0) of `count`, optionally split again into `rank` of `world` (launched processes)."""

    index: int = 0
    count: int = 1
    rank: int = 0
    world: int = 1

    def __contains__(self, key: str) -> bool:
        h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
        return h % self.count == self.index and (h // self.count) % self.world == self.rank

    @property
    def everything(self) -> bool:
        return self.count == 1 and self.world == 1

    def describe(self) -> str:
        parts = [f"shard {self.index}/{self.count}"] if self.count > 1 else []
        if self.world > 1:
            parts.append(f"process {self.rank}/{self.world}")
        return ", ".join(parts)


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (0-based, as Slurm's SLURM_ARRAY_TASK_ID with --array=0-99)."""
    if text is None:
        return 0, 1
    match = _SHARD.match(text)
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise CapcliError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/100")
    return int(match[1]), int(match[2])


def launched_rank() -> tuple[int, int]:
    """(rank, world size) set by torchrun or accelerate launch; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def job_shard(text: str | None) -> Shard:
    """The part of the inputs this process takes: --shard, then split again across launched processes."""
    index, count = parse_shard(text)
    rank, world = launched_rank()
    return Shard(index, count, rank, world)
