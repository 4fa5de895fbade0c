"""Keep freed memory for reuse (glibc), so the encoder does not fault in fresh pages on every forward.

glibc's malloc gives large blocks their own mmap and unmaps them when freed, and returns freed memory at
the top of its heap to the kernel; the CNN encoder allocates and frees activations of several MB per layer,
so each forward pays for page faults on freshly zeroed pages. Raising both thresholds keeps freed blocks in
the heap (`python benchmarks/sweeps.py encoder` measures it; the README has the figures). The CLI sets it
for its own process only; a program that imports capcli keeps its allocator as it is.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """True if set; False where the C library is not glibc (macOS, musl) or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
