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
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give the name of a file to write")
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
    fmt = Path(path).suffix.lstrip(".").lower() or "png"  # not from the temporary name's suffix
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))


def replace_dir(new: Path, target: Path, kind: str) -> None:
    """Move the finished folder ``new`` onto ``target``, replacing what was there only when that is
    m4oe's own ``kind`` (or an empty folder); anything else raises :class:`OutputError`."""
    target = Path(target)
    if target.exists():
        check_output_dir(target, kind, option="folder")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The rule for every folder m4oe writes: it never deletes or replaces anything it did not create.
# ------------------------------------------------------------------------------------------------

MARKER = ".m4oe.json"  # names what an m4oe output folder is: {"kind": "cache" | "run" | ...}
FOLDER_KINDS = ("cache", "run", "predictions", "experts", "demo", "bundle", "statistics")


class OutputError(ValueError):
    """An output path would replace or mix with something m4oe did not write."""


def folder_kind(path: str | os.PathLike) -> str | None:
    """What m4oe output ``path`` is: the kind its marker names, or, for folders written before the
    marker existed, a kind recognised by what they hold (a complete cache, a run, a model bundle);
    None for anything else."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return kind if kind in FOLDER_KINDS else None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if "meta.json" in names and names <= {"meta.json", "images.npy", "labels.npy", "index.npz"}:
        if "fingerprint" in _json_or_empty(path / "meta.json"):
            return "cache"
    if _json_or_empty(path / "config.json").get("format") == "m4oe-bundle":
        return "bundle"
    if (path / "last").is_dir() and folder_kind(path / "last") == "bundle":
        return "run"
    if "demo.yaml" in names and "cache" in names:
        return "demo"
    return None


def _json_or_empty(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def check_output_dir(
    path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike] = (), option: str = "-o"
) -> Path:
    """Refuse, before any work, an output folder that m4oe may not fill with ``kind``: an existing
    file, a folder holding anything that is not m4oe's own ``kind`` (a dataset, a thesis, a cache
    given as a run), or a path that is, holds or lies inside one of ``inputs``. Returns ``path``."""
    path = Path(path)
    where = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise OutputError(f"{where}: is a file, not a folder; give a new or empty folder for the {kind}")
    resolved = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source:
            raise OutputError(f"{where}: is the input {source}; give another folder for the {kind}")
        if source.is_relative_to(resolved):
            raise OutputError(f"{where}: holds the input {source}; give a folder outside it for the {kind}")
        if source.is_dir() and resolved.is_relative_to(source):
            raise OutputError(f"{where}: lies inside the input {source}; give a folder outside it for the {kind}")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    found = folder_kind(path)
    if found == kind:
        return path
    if found is not None:
        raise OutputError(f"{where}: is m4oe's {found} folder, not a {kind} folder; give a new or empty folder")
    sample = sorted(p.name for p in path.iterdir())[:3]
    raise OutputError(
        f"{where}: holds files m4oe did not write ({', '.join(sample)}{', ...' if len(sample) == 3 else ''}); "
        f"give a new or empty folder for the {kind}"
    )


def mark_output_dir(path: str | os.PathLike, kind: str) -> Path:
    """Create ``path`` (if needed) and record that it holds m4oe's ``kind``."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if folder_kind(path) != kind or not (path / MARKER).is_file():
        write_json(path / MARKER, {"kind": kind})
    return path


def dataset_root(path: str | os.PathLike) -> Path | None:
    """The nnU-Net dataset folder (one with ``dataset.json``) that ``path`` is or lies in, if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / "dataset.json").is_file():
            return folder
    return None
