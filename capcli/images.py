"""Finding images on disk and decoding them safely, in parallel, for batched encoding."""

from __future__ import annotations

import glob
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from capcli.errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 89_478_485  # Pillow's default bomb limit (about 9,500 x 9,500); larger images are refused


def is_image_name(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(path: Path):
    """Decode one image to RGB: first frame of animations, EXIF orientation applied, transparency on white,
    16-bit scaled to 8-bit. Raises InputError with the reason for anything that is not a usable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:  # whatever Image.MAX_IMAGE_PIXELS says
                    raise Image.DecompressionBombError(path)
                img.seek(0)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        reason = "broken symbolic link" if path.is_symlink() else "no such file"
        raise InputError(path, reason) from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(path, f"image too large (over {MAX_PIXELS:,} pixels), refused as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise InputError(path, "not an image (unrecognised or empty file)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(path, f"corrupt or truncated image ({exc})") from None


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        import numpy as np

        array = np.asarray(img, dtype=np.float64)
        top = array.max() or 1.0
        img = Image.fromarray((array / top * 255).astype("uint8"), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def find_images(inputs: Iterable[str], recursive: bool = False, stdin=None) -> Iterator[tuple[Path, str]]:
    """Expand files, folders (`recursive` walks below), globs and `-` (paths from stdin, one a line) into
    (path, shard key): the key is the path relative to the folder given, or the path as given. Named files
    are yielded as given, images or not, so a bad one is reported rather than ignored."""
    for item in inputs:
        if item == "-":
            for line in stdin or sys.stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield Path(line), Path(line).as_posix()
            continue
        path = Path(item)
        if path.is_dir():
            yield from ((p, p.relative_to(path).as_posix()) for p in _walk(path, recursive))
        elif path.exists() or path.is_symlink():
            yield path, path.as_posix()
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            yield from ((Path(m), Path(m).as_posix()) for m in matches if not Path(m).is_dir())
            if not matches:
                yield path, path.as_posix()  # reported later as "no such file"
        else:
            yield path, path.as_posix()


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    if not recursive:
        yield from sorted(p for p in folder.iterdir() if is_image_name(p) and not p.is_dir())
        return
    for root, dirs, files in os.walk(folder, followlinks=False):  # no symlink loops
        dirs.sort()
        for name in sorted(files):
            if is_image_name(Path(name)):
                yield Path(root) / name


class ImageFolderDataset:
    """A torch-style dataset: item i is (i, tensor) or (i, InputError). Decoding runs in DataLoader workers."""

    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocess(open_image(self.paths[index]))
        except InputError as exc:
            return index, exc


def collate_images(items):
    """Stack the decoded images; carry the failures alongside as (index, InputError)."""
    import torch

    good = [(i, t) for i, t in items if not isinstance(t, InputError)]
    failed = [(i, t) for i, t in items if isinstance(t, InputError)]
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, failed


def image_batches(paths: list[Path], preprocess, batch_size: int, workers: int | None = None):
    """Yield (indices, images (B, 3, H, W) or None, [(index, InputError)]), decoding in worker processes."""
    from torch.utils.data import DataLoader

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(paths) > batch_size else 0
    loader = DataLoader(ImageFolderDataset(paths, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_images,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    yield from loader
