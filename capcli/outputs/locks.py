"""One writer per output: an advisory lock, so two jobs never interleave records in one file.

The lock is a small file in capcli's cache named after the target's absolute path, held with flock() for
the whole job and holding the job's pid. The kernel releases it when the process exits, crash included; the
file itself may stay behind and is harmless. Only POSIX systems have flock(); elsewhere nothing is locked.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from capcli.errors import CapcliError
from capcli.files import cache_dir


def lock_path(target: Path) -> Path:
    key = hashlib.sha256(str(Path(os.path.abspath(target))).encode()).hexdigest()[:32]
    return cache_dir() / "locks" / f"{key}.lock"


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold the lock on `target` (a file or folder) while the block runs. If another process holds it,
    stop with one line naming that process; `what` says what is being written ("output", "sidecars")."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise CapcliError(f"{target}: another capcli job (pid {holder}) is writing its {what}; wait for it "
                              f"to finish or choose another target") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
