"""Atomic file writes: every output is written to a temporary file next to it and renamed.

A reader (or a crash) never sees half a file: the target is either the old version or the new one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def _suffix(path: Path) -> str:
    # keep the extension on the temporary name: writers (SimpleITK, matplotlib) pick the format from it
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` with a temporary path next to ``path``, then rename it onto ``path``.

    The parent folder is created; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        # some writers (safetensors) create private 0600 files: give the usual umask-based mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


# read at import, not per write: setting the process-wide umask while writer threads create files races
_UMASK = _read_umask()


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1) -> Path:
    """JSON with NumPy/torch scalars written as floats."""
    return write_text(path, json.dumps(payload, indent=indent, default=float))


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (the caller closes it)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` onto ``target``, replacing what was there."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
