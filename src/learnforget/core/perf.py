"""Process-level speed settings for CPU work: the memory allocator.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB with the
dynamic threshold) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A training
step on the default study's model allocates tensors of that size every step (the 16 x 128 x
4096 logits and their gradient are 32 MiB each), so each step the kernel maps, zero-fills and
unmaps them again: page faults that cost 13-18% of a CPU training step on 2 cores
(``bench/train.py``). ``tune_allocator`` raises the mmap and trim thresholds, so freed blocks
stay in the heap and the next step reuses them. It changes where memory comes from, never a
number that is computed; the cost is that a process keeps its peak heap until it exits.

It is called by the entry points that do tensor work (training, evaluation); it does nothing
where the C library is not glibc, and ``LEARNFORGET_MALLOC=default`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 31  # 2 GiB: no single tensor of these jobs' CPU work is mmapped on its own

_applied: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("LEARNFORGET_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
    return _applied
