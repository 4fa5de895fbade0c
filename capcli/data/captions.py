"""Caption data sets: what `--data` can point at, read into one shape (image path -> its captions).

Recognised: the Flickr8k `captions.txt` CSV (`image,caption`), Flickr `*.token.txt` (`name#k<TAB>caption`),
COCO captions JSON, JSONL or CSV manifests (`image` and `caption` fields), and a folder of images each with
a sidecar `.txt` caption.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from capcli.data.images import is_image_name
from capcli.errors import DataError

IMAGE_FOLDERS = ("", "images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset")


@dataclass
class CaptionSet:
    """Images (in a stable order) with their reference captions, plus what was skipped and why."""

    source: Path
    captions: dict[Path, list[str]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> list[Path]:
        return list(self.captions)

    @property
    def pairs(self) -> list[tuple[Path, str]]:
        return [(image, caption) for image, caps in self.captions.items() for caption in caps]

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, example)

    def report(self) -> str:
        """One line: what was kept and what was skipped, with an example of each problem."""
        kept = f"{len(self.captions)} images, {sum(len(c) for c in self.captions.values())} captions from {self.source}"
        if not self.skipped:
            return kept
        problems = "; ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.items())
        return f"{kept}; skipped {problems}"


def load_captions(data: Path, split: Path | None = None) -> CaptionSet:
    """Read a data set (folder or file) and keep the images named in `split`, if given."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    file = _find_annotation_file(data) if data.is_dir() else data
    root = data if data.is_dir() else data.parent
    result = CaptionSet(source=file or data)
    rows = _sidecar_rows(data) if file is None else _read_rows(file)
    image_root = _image_root(root, rows)
    wanted = _read_split(split) if split is not None else None
    exists: dict[str, bool] = {}  # one stat per image, not per caption
    for name, caption in rows:
        if name is None:
            result.skip("malformed rows", caption)
            continue
        if wanted is not None and name not in wanted and Path(name).name not in wanted:
            continue
        caption = " ".join((caption or "").split())
        if not name:
            result.skip("rows without an image", repr(caption[:40]))
            continue
        if not caption:
            result.skip("empty captions", name)
            continue
        path = image_root / name
        if not _inside(path, root):
            result.skip("paths outside the data folder", name)
            continue
        if name not in exists:
            exists[name] = path.is_file()
        if not exists[name]:
            result.skip("missing images", name)
            continue
        captions = result.captions.setdefault(path, [])
        if caption in captions:
            result.skip("duplicate rows", f"{name}: {caption[:40]}")
            continue
        captions.append(caption)
    if wanted is not None:
        found = {p.name for p in result.captions} | {str(p.relative_to(image_root)) for p in result.captions}
        for name in wanted:
            if name not in found:
                result.skip("split names without captions or images", name)
    if not result.captions:
        raise DataError(f"no usable images with captions in {data}: {result.report()}")
    return result


def _find_annotation_file(folder: Path) -> Path | None:
    for pattern in ("captions.txt", "*.token.txt", "captions.json", "*.jsonl", "captions.csv", "*.json", "*.csv"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None  # a folder of images with sidecar .txt captions


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None


def _read_rows(file: Path) -> list[tuple[str, str]]:
    """(image name, caption) pairs, in file order."""
    if file.suffix == ".json":
        return _coco_rows(file)
    text = _read_text(file)
    if file.suffix == ".jsonl":
        return _jsonl_rows(file, text)
    first = text.split("\n", 1)[0]
    if "\t" in first and "#" in first.split("\t", 1)[0]:  # Flickr token format: name.jpg#0<TAB>caption
        return [(line.split("\t", 1)[0].rsplit("#", 1)[0], line.split("\t", 1)[1])
                for line in text.splitlines() if "\t" in line]
    return _csv_rows(file, text)


def _csv_rows(file: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = {name.strip().lower(): name for name in reader.fieldnames or []}
    if "image" not in fields or "caption" not in fields:
        raise DataError(f"{file}: a CSV needs the columns 'image' and 'caption' (found: {', '.join(fields) or 'none'})")
    return [(row[fields["image"]] or "", row[fields["caption"]] or "") for row in reader]


def _jsonl_rows(file: Path, text: str) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            rows.append((None, f"line {number}: not a JSON object"))  # counted and skipped
            continue
        captions = record.get("caption", "")
        for caption in captions if isinstance(captions, list) else [captions]:
            rows.append((str(record.get("image") or ""), str(caption or "")))
    return rows


def _coco_rows(file: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(_read_text(file))
        names = {image["id"]: image["file_name"] for image in data["images"]
                 if isinstance(image, dict) and "id" in image and "file_name" in image}
        return [(names.get(a.get("image_id"), ""), str(a.get("caption") or "")) for a in data["annotations"]]
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc.msg})") from None
    except (KeyError, TypeError):
        raise DataError(f"{file}: not COCO captions JSON (needs 'images' with id/file_name and "
                        f"'annotations' with image_id/caption)") from None


def _sidecar_rows(folder: Path) -> list[tuple[str, str]]:
    rows = []
    for image in sorted(p for p in folder.rglob("*") if is_image_name(p) and p.is_file()):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            for caption in _read_text(sidecar).splitlines():
                rows.append((str(image.relative_to(folder)), caption))
    if not rows:
        raise DataError(f"{folder}: no captions file (captions.txt, *.token.txt, COCO .json, .jsonl, .csv) and "
                        f"no images with sidecar .txt captions")
    return rows


def _image_root(root: Path, rows: list[tuple[str, str]]) -> Path:
    """Where the images named in the annotations live: the data folder or a usual subfolder of it."""
    sample = [name for name, _ in rows[:50] if name]
    for sub in IMAGE_FOLDERS:
        candidate = root / sub
        if any((candidate / name).is_file() for name in sample):
            return candidate
    return root


def _inside(path: Path, root: Path) -> bool:
    """True when `path` stays inside `root` once `..` parts are resolved (no '../../etc/passwd', no /abs/paths)."""
    path, root = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return path == root or path.startswith(root + os.sep)


def _read_split(split: Path) -> set[str]:
    wanted = {line.strip() for line in _read_text(Path(split)).splitlines() if line.strip()}
    if not wanted:
        raise DataError(f"{split}: split file is empty; it should name one image a line")
    return wanted
