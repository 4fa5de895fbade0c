"""The feature cache written by `extract` and read by `train`: each image is encoded once per encoder.

FEATURES/
  index.sqlite                 files(path, size, mtime_ns, sha256), features(encoder_id, sha256, shard, row)
                               and objects(detector_id, sha256, detections as JSON)
  shards/<encoder>/<id>.safetensors   pooled (n, D) float32 (shards of capcli 0.4 also hold grids, unread)

Features are keyed by the image's content hash and the encoder id, so a renamed or copied image is not
encoded again and a changed one is. A shard is written whole (temporary file, then rename) before its
rows enter the index in one transaction, so an interrupted run leaves a consistent cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from capcli.data.images import image_batches
from capcli.errors import DataError, InputError
from capcli.files import temporary_sibling

SHARD_SIZE = 1024  # images per shard file
INDEX_BATCH = 256  # new file hashes per index transaction


class FeatureCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.folder / "index.sqlite", timeout=60)
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                                "mtime_ns INTEGER, sha256 TEXT)")
                self.db.execute("CREATE TABLE IF NOT EXISTS features (encoder_id TEXT, sha256 TEXT, shard TEXT, "
                                "row INTEGER, PRIMARY KEY (encoder_id, sha256))")
                self.db.execute("CREATE TABLE IF NOT EXISTS objects (detector_id TEXT, sha256 TEXT, detections TEXT, "
                                "PRIMARY KEY (detector_id, sha256))")
        except (OSError, sqlite3.Error) as exc:
            raise DataError(f"{self.folder}: cannot open the feature cache ({exc})") from None

    def digest(self, path: Path) -> str | None:
        """The image's sha256, from the index when size and mtime are unchanged. None if unreadable."""
        [(_, sha)] = self.digests([path])  # unpacking runs the generator to its end, which records the hash
        return sha

    def digests(self, paths: Iterable[Path]) -> Iterator[tuple[Path, str | None]]:
        """(path, digest(path)) for each path in turn. New hashes enter the index in one transaction per
        INDEX_BATCH files: a commit per file costs more than hashing the file."""
        new_rows: list[tuple] = []
        try:
            for path in paths:
                sha, row = self._digest(path)
                if row:
                    new_rows.append(row)
                if len(new_rows) >= INDEX_BATCH:
                    self._record(new_rows)
                    new_rows = []
                yield path, sha
        finally:
            self._record(new_rows)

    def _digest(self, path: Path) -> tuple[str | None, tuple | None]:
        key = os.path.abspath(path)
        try:
            stat = os.stat(path)
        except OSError:
            return None, None
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (key,)).fetchone()
        if row and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
            return row[2], None
        try:
            with open(path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return None, None
        return sha, (key, stat.st_size, stat.st_mtime_ns, sha)

    def _record(self, rows: list[tuple]) -> None:
        if rows:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", rows)

    def has(self, encoder_id: str, sha: str) -> bool:
        return self.db.execute("SELECT 1 FROM features WHERE encoder_id = ? AND sha256 = ?",
                               (encoder_id, sha)).fetchone() is not None

    def has_objects(self, detector_id: str, sha: str) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE detector_id = ? AND sha256 = ?",
                               (detector_id, sha)).fetchone() is not None

    def add_objects(self, detector_id: str, shas: list[str], detections: list[list]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                                [(detector_id, sha, json.dumps([d.to_dict() for d in row]))
                                 for sha, row in zip(shas, detections)])

    def objects(self, detector_id: str, shas: list[str]) -> list[list]:
        """The detections of these images in this order (capcli.steering.detector.Detection)."""
        from capcli.steering.detector import Detection

        found = []
        for sha in shas:
            row = self.db.execute("SELECT detections FROM objects WHERE detector_id = ? AND sha256 = ?",
                                  (detector_id, sha)).fetchone()
            if row is None:
                raise DataError(f"{self.folder}: no {detector_id} detections for image {sha[:12]}; run capcli extract")
            found.append([Detection.from_dict(d) for d in json.loads(row[0])])
        return found

    def add(self, encoder_id: str, shas: list[str], pooled: torch.Tensor) -> None:
        """Write one shard, then index its rows."""
        from safetensors.torch import save_file

        shard = Path("shards") / _safe(encoder_id) / f"{uuid.uuid4().hex}.safetensors"
        target = self.folder / shard
        tmp = temporary_sibling(target)
        try:
            save_file({"pooled": pooled.float().contiguous()}, str(tmp),
                      metadata={"encoder_id": encoder_id})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                                [(encoder_id, sha, str(shard), row) for row, sha in enumerate(shas)])

    def load(self, encoder_id: str, shas: list[str]) -> torch.Tensor:
        """Pooled features (n, D) for these images, in this order."""
        from safetensors import safe_open

        where: dict[str, list[tuple[int, int]]] = {}
        for position, sha in enumerate(shas):
            row = self.db.execute("SELECT shard, row FROM features WHERE encoder_id = ? AND sha256 = ?",
                                  (encoder_id, sha)).fetchone()
            if row is None:
                raise DataError(f"{self.folder}: no {encoder_id} features for image {sha[:12]}; run capcli extract")
            where.setdefault(row[0], []).append((position, row[1]))
        out = None
        for shard, places in where.items():
            with safe_open(str(self.folder / shard), framework="pt") as f:
                block = f.get_tensor("pooled").float()
            if out is None:
                out = torch.empty((len(shas), *block.shape[1:]))
            positions, rows = zip(*places)
            out[list(positions)] = block[list(rows)]
        return out if out is not None else torch.empty(0)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# Up to this many images, extraction on a CPU decodes them in its own process: starting decoding workers
# costs more than it saves (`python benchmarks/sweeps.py workers`). Larger jobs get workers, because camera
# photos can cost more to decode than to encode.
SMALL_JOB = 100


def extract(paths: list[Path], encoder, cache: FeatureCache, device: torch.device, batch_size: int | None = None,
            workers: int | None = None, progress: Callable[[int], None] = lambda n: None, detector=None):
    """Encode every image not yet in the cache (and detect its objects, with a detector). Returns (digests by
    path, number encoded, failures).

    batch_size defaults to 64 on a GPU and devices.CPU_BATCH (4) on a CPU.

    failures is a list of InputError; progress(n) is called as images are done (cached ones at once)."""
    from capcli.devices import CPU_BATCH

    digests, todo, encoded_already, failures = _missing(paths, encoder, cache, progress, detector)
    encoded = 0
    failed_shas: set[str] = set()
    batch_size = batch_size or (64 if device.type == "cuda" else CPU_BATCH)
    if todo:
        if workers is None and len(todo) <= SMALL_JOB and device.type == "cpu":
            workers = 0  # decode in this process: starting workers costs more than it saves
        encoded, failed = _encode(list(todo), list(todo.values()), encoded_already, encoder.to(device), cache,
                                  device, batch_size, workers, progress, detector)
        failures += [error for _, error in failed]
        failed_shas = {sha for sha, _ in failed}
    digests = {path: sha for path, sha in digests.items() if sha not in failed_shas}  # copies of a bad file too
    return digests, encoded, failures


def _missing(paths: list[Path], encoder, cache: FeatureCache, progress, detector):
    """Each readable path's content digest; one path per distinct content the cache lacks (features, or with
    a detector its objects), with the digests whose features are there already; unreadable files."""
    digests: dict[Path, str] = {}
    failures: list[InputError] = []
    todo: dict[str, Path] = {}  # one path per distinct content
    encoded_already: set[str] = set()  # in todo for their objects only
    for path, sha in cache.digests(paths):
        if sha is None:
            failures.append(InputError(path, "cannot read the file"))
            progress(1)
            continue
        digests[path] = sha
        if sha in todo:
            progress(1)
        elif not cache.has(encoder.encoder_id, sha):
            todo[sha] = path
        elif detector is not None and not cache.has_objects(detector.detector_id, sha):
            todo[sha] = path
            encoded_already.add(sha)
        else:
            progress(1)
    return digests, todo, encoded_already, failures


def _encode(shas: list[str], files: list[Path], encoded_already: set[str], encoder, cache: FeatureCache, device,
            batch_size: int, workers: int | None, progress, detector) -> tuple[int, list[tuple[str, InputError]]]:
    """Decode, detect and encode the files into the cache, a shard at a time; how many were encoded, and the
    (digest, error) of those that could not be decoded. A stop keeps what was encoded before it."""
    from capcli.devices import autocast

    encoded, failed_files = 0, []
    buffer: list[tuple[list[str], torch.Tensor]] = []
    buffered = 0
    try:
        for indices, images, failed, objects in image_batches(files, encoder.preprocess, batch_size, workers,
                                                              detector):
            failed_files += [(shas[i], error) for i, error in failed]
            if objects is not None:
                cache.add_objects(detector.detector_id, [shas[i] for i in indices], objects)
            new = [k for k, i in enumerate(indices) if shas[i] not in encoded_already]
            if new:
                with torch.inference_mode(), autocast(device):
                    pooled = encoder(images[new].to(device)).float().mean(1)  # (B, D)
                buffer.append(([shas[indices[k]] for k in new], pooled.cpu()))
                buffered += len(new)
                encoded += len(new)
            if buffered >= SHARD_SIZE:
                _flush(cache, encoder.encoder_id, buffer)
                buffer, buffered = [], 0
            progress(len(indices) + len(failed))
    finally:
        _flush(cache, encoder.encoder_id, buffer)
    return encoded, failed_files


def _flush(cache: FeatureCache, encoder_id: str, buffer) -> None:
    if buffer:
        cache.add(encoder_id, [s for shas, _ in buffer for s in shas], torch.cat([p for _, p in buffer]))
