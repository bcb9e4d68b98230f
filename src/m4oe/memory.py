"""Process-wide allocator setting for CPU runs: keep freed memory for reuse.

glibc's ``malloc`` hands every block above its mmap threshold (a few MiB once adapted) back to the
kernel on ``free`` and maps fresh zeroed pages on the next ``malloc``. A model's activations are
exactly such blocks (a stage-1 hidden layer of ``m4oe-t`` at batch 16 is 231 MB in fp32), freed and
allocated again every forward, so a CPU forward pays a page fault per 4 KiB of activations: on the
2-core development machine the kernel's share of a predict run was about a third of its time.
Raising the mmap and trim thresholds keeps those pages in the heap to be reused. The process's
resident memory then stays near its peak instead of shrinking between batches; the peak itself
does not grow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_version = libc.gnu_get_libc_version  # only glibc has it; musl would ignore the parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del gnu_version
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
