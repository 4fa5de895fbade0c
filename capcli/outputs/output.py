"""Writing captions: text (`path<TAB>caption`), JSON lines or CSV to stdout or a file, and text sidecars.

Each record is written with one write() and flushed, so an interrupted run leaves only whole records,
and `--resume` can read back which images are done.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath
from typing import TextIO

from capcli.errors import CapcliError
from capcli.files import atomic_write_text


class CaptionWriter:
    """One record per image. With labels: JSON "labels" and "objects" lists, CSV "labels" and "objects" columns,
    a third and fourth text column."""

    def __init__(self, stream: TextIO, fmt: str, write_header: bool, labels: bool = False, explain: bool = False):
        self.stream, self.fmt, self.labels, self.explain = stream, fmt, labels, explain
        if fmt == "csv" and write_header:
            self._write(["image", "caption"] + (["labels", "objects"] if labels else []))

    def _write(self, row) -> None:
        if self.fmt == "csv":
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow(row)
            text = buffer.getvalue()
        elif self.fmt == "jsonl":
            text = json.dumps(row, ensure_ascii=False) + "\n"
        else:
            text = "\n".join("\t".join([row[0], caption, *row[2:]]) for caption in row[1]) + "\n"
        self.stream.write(text)
        self.stream.flush()

    def write(self, image: Path, captions: list[str], labels: list[tuple[str, float]] | None = None,
              neighbours: list | None = None, objects: list | None = None) -> None:
        shown = [format_labels(labels or []), format_objects(objects or [])] if self.labels else []
        if self.fmt == "jsonl":
            record = {"image": str(image), "caption": captions[0]}
            if len(captions) > 1:
                record["captions"] = captions
            if self.labels:
                record["labels"] = [[noun, score] for noun, score in labels or []]
                record["objects"] = [d.to_dict() for d in objects or []]
            if self.explain:
                record["neighbours"] = [{"image": n.image, "similarity": n.similarity, "captions": n.captions}
                                        for n in neighbours or []]
            self._write(record)
        elif self.fmt == "csv":
            for caption in captions:
                self._write([str(image), caption, *shown])
        else:
            self._write((str(image), captions, *shown))

    def fail(self, message: str, image: Path | None = None) -> None:
        """JSON lines get a record of each failure, {"image", "error"}, beside stderr's line (--resume tries
        those images again); text and CSV keep one caption per line, so failures go to stderr only."""
        if self.fmt == "jsonl" and image is not None:
            self._write({"image": str(image), "error": message})

    def close(self) -> None:
        """Nothing to do: each record was flushed as it was written."""


def format_labels(labels: list[tuple[str, float]]) -> str:
    """"cat 0.88; laptop 0.41": the CSV and text form of an image's labels."""
    return "; ".join(f"{noun} {score:.2f}" for noun, score in labels)


def format_objects(objects: list) -> str:
    """"person x2 0.91; dog 0.88": the CSV and text form of an image's detections (count, best score)."""
    best: dict[str, list] = {}
    for d in objects:
        best.setdefault(d.label, []).append(d.score)
    return "; ".join(f"{label}{f' x{len(s)}' if len(s) > 1 else ''} {max(s):.2f}" for label, s in best.items())


def done_images(path: Path, fmt: str) -> set[str]:
    """Images already in an output file, for --resume. A torn last line (no newline) is not counted."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as exc:
        raise CapcliError(f"{path}: cannot read it to resume ({exc})") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        atomic_write_text(path, text)  # drop the torn record so the file stays well-formed
    if fmt == "jsonl":
        done = set()
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if "error" not in record:
                    done.add(record["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CapcliError(f"{path}: not a capcli JSON lines file; cannot --resume into it") from None
        return done
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        return {row[0] for row in rows[1:] if row}
    return {line.split("\t", 1)[0] for line in text.splitlines() if "\t" in line}


def sidecar_path(image: Path, key: str, suffix: str, folder: Path | None = None, full_name: bool = False) -> Path:
    """Where an image's sidecar goes: beside it, or under `folder` mirroring the input's structure (`key`
    is the image's path relative to the folder given on the command line, or the path as given). The suffix
    replaces the image's (a.txt), or with full_name follows it (a.jpg.txt), which keeps a.jpg's and a.png's
    apart."""
    if folder is not None:
        parts = [part for part in PurePosixPath(key).parts if part not in ("/", ".", "..") and not part.endswith(":")]
        image = folder.joinpath(*parts)
    return image.with_name(image.name + suffix) if full_name else image.with_suffix(suffix)


def write_text_sidecar(path: Path, captions: list[str], existing: str = "overwrite", join: str = ", ") -> None:
    """One caption a line; with existing "append" or "prepend", joined to the text already there by `join`."""
    text = "\n".join(captions)
    if existing in ("append", "prepend") and path.exists():
        old = path.read_text(encoding="utf-8").rstrip("\r\n")
        if old:
            text = old + join + text if existing == "append" else text + join + old
    atomic_write_text(path, text + "\n")


def part_path(output: Path, rank: int, world: int) -> Path:
    """Where launched process `rank` writes its captions before the main process merges them into output."""
    return output.with_name(f"{output.name}.part{rank}of{world}")


def merge_parts(output: Path, parts: list[Path], append: bool) -> None:
    """Concatenate the parts (in rank order) into output, after what it holds when appending; atomic;
    then remove the parts. Only part 0 carries a CSV header, so plain concatenation is right."""
    import shutil

    from capcli.files import atomic_writer

    sources = ([output] if append and output.exists() else []) + [p for p in parts if p.exists()]
    with atomic_writer(output) as merged:
        for source in sources:
            with open(source, "rb") as f:
                shutil.copyfileobj(f, merged)
    for part in parts:
        part.unlink(missing_ok=True)
