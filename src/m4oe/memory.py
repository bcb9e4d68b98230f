"""Process-wide allocator setting for CPU runs: keep freed memory for reuse.

glibc's ``malloc`` hands every block above its mmap threshold (a few MiB once adapted) back to the
kernel on ``free`` and maps fresh zeroed pages on the next ``malloc``. A model's activations are
exactly such blocks (a stage-1 hidden layer of ``m4oe-t`` at batch 16 is 231 MB in fp32), freed and
allocated again every forward, so a CPU forward pays a page fault per 4 KiB of activations: on the
2-core development machine half the time of a loop of ``m4oe-t`` forwards went to the kernel.
Raising the mmap and trim thresholds keeps those pages in the heap to be reused (most of them: a
freed block is reused where a new request fits in it). The process's
resident memory then stays near its peak instead of shrinking between batches, and the peak grows
a little (a batch-16 ``m4oe predict``: 2.5-2.6 GB -> 2.9-3.2 GB; 1.8-2.1 GB at the CPU default of 8).
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks larger than 1 GiB are still mapped and unmapped on their own
TRIM_THRESHOLD = (1 << 31) - 1  # largest value mallopt's int takes: up to 2 GiB of free heap top is kept

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse (see the module docstring); ``True`` if it took.

    Returns ``False`` and changes nothing where the C library is not glibc (macOS, Windows, musl).
    Safe to call more than once.
    """
    global _applied
    if _applied is None:
        _applied = _set_glibc_thresholds()
    return _applied


def _set_glibc_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded in this process, the C library's among them
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # musl has mallopt, ignoring it
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
