"""Finding images on disk and decoding them safely, in parallel, for batched encoding."""

from __future__ import annotations

import glob
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

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
        if path.is_dir() and is_image_name(path):  # a folder named like a photo: reported, not walked
            yield path, path.as_posix()
        elif path.is_dir():
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
    """A torch-style dataset: item i is (i, tensor, detections or None) or (i, InputError, None). Decoding, and
    object detection when a detector is given, run in DataLoader workers."""

    def __init__(self, paths: list[Path], preprocess, detector=None):
        self.paths, self.preprocess, self.detector = paths, preprocess, detector

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = open_image(self.paths[index])
            return index, self.preprocess(image), self._detect(self.paths[index], image)
        except InputError as exc:
            return index, exc, None

    def _detect(self, path: Path, image):
        if self.detector is None:
            return None
        try:
            return self.detector.detect(image)
        except Exception as exc:  # noqa: BLE001 - one photo the detector cannot read fails alone
            raise InputError(path, f"the object detector cannot read it ({type(exc).__name__}: {exc})") from None


class Batch(NamedTuple):
    indices: list[int]  # positions in the input list of the images decoded
    images: object  # (B, 3, H, W) tensor, or None when none could be decoded
    failed: list  # [(index, InputError)]
    objects: list | None  # per decoded image, its detections (with a detector)


def collate_images(items) -> Batch:
    """Stack the decoded images; carry the failures alongside as (index, InputError)."""
    import torch

    good = [(i, t, d) for i, t, d in items if not isinstance(t, InputError)]
    failed = [(i, t) for i, t, _ in items if isinstance(t, InputError)]
    batch = torch.stack([t for _, t, _ in good]) if good else None
    objects = [d for _, _, d in good] if good and good[0][2] is not None else None
    return Batch([i for i, _, _ in good], batch, failed, objects)


def image_batches(paths: list[Path], preprocess, batch_size: int, workers: int | None = None,
                  detector=None) -> Iterator[Batch]:
    """Yield a Batch at a time, decoding (and detecting objects, with a detector) in worker processes."""
    from torch.utils.data import DataLoader

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(paths) > batch_size else 0
    loader = DataLoader(ImageFolderDataset(paths, preprocess, detector), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_images,
                        worker_init_fn=_one_opencv_thread if detector is not None else None,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    yield from loader


def _one_opencv_thread(_worker: int) -> None:
    """Detecting workers run side by side: one OpenCV thread each, so they do not fight over the cores. Not
    where OpenCV was loaded before the fork: resizing a thread pool inherited from the parent can deadlock."""
    if "cv2" in sys.modules:
        return
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)
