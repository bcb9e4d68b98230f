"""The slice cache on disk, in one place: its files, how they are written and how they are opened.

A cache is a folder holding

* ``images.npy`` ``[N, S, S]`` (float16, or uint8 with a per-slice affine) and ``labels.npy``
  ``[N, S, S]`` uint8 (union-vocabulary class indices), both memory-mapped;
* ``index.npz``: per slice the fields of :data:`INDEX_FIELDS`;
* ``meta.json``: vocabulary, label sets, modalities, per-dataset settings and normalisation, every
  case's files, geometry and slice plan, a fingerprint of the inputs, and ``complete: true`` once
  everything else is written.

``m4oe prepare`` writes it (:mod:`m4oe.data.prepare`), :class:`m4oe.data.loader.SliceCache` reads it,
and :func:`synthetic_cache` writes a random one for benchmarks on machines without the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import assign_folds

FORMAT = 1
IMAGES, LABELS, INDEX, META = "images.npy", "labels.npy", "index.npz", "meta.json"
FILES = (IMAGES, LABELS, INDEX, META)
INDEX_FIELDS = {  # name -> dtype of its per-slice array
    "dataset": np.int16, "modality": np.int16, "labeled": bool, "case": np.int32, "z": np.int32,
    "foreground": np.float32, "scale": np.float32, "offset": np.float32,
}  # fmt: skip


def create_arrays(folder: Path, storage: str, slices: int, size: int) -> tuple[Path, Path]:
    """Empty ``images.npy`` (``storage`` dtype) and ``labels.npy`` of ``slices`` slices, on disk."""
    images, labels = folder / IMAGES, folder / LABELS
    np.lib.format.open_memmap(images, "w+", np.dtype(storage), (slices, size, size)).flush()
    np.lib.format.open_memmap(labels, "w+", np.uint8, (slices, size, size)).flush()
    return images, labels


def open_arrays(folder: Path, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped images and labels (``mode`` ``r+`` to fill them)."""
    return np.load(folder / IMAGES, mmap_mode=mode), np.load(folder / LABELS, mmap_mode=mode)


def write_index(folder: Path, **arrays: np.ndarray) -> None:
    """``index.npz`` from exactly the per-slice arrays of :data:`INDEX_FIELDS`."""
    if set(arrays) != set(INDEX_FIELDS):
        raise ValueError(f"index fields {sorted(arrays)} are not {sorted(INDEX_FIELDS)}")
    np.savez(folder / INDEX, **{name: np.asarray(arrays[name], INDEX_FIELDS[name]) for name in INDEX_FIELDS})


def read_index(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / INDEX) as index:
        return {key: index[key] for key in index.files}


@dataclass(frozen=True)
class DatasetMeta:
    """One dataset of a cache as ``meta.json`` records it (``record``: the whole entry as written)."""

    name: str
    modality: str
    labeled: bool
    label_values: dict[str, int]  # class name -> the dataset's label value
    normalization: dict[str, Any]  # the intensity normalisation and its statistics
    flip: list[str]
    fov: float
    fingerprint: str | None
    validation_fold: int | None  # the fold of the split whose cases are validation cases (None: no split)
    record: dict[str, Any]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DatasetMeta:
        return cls(record["name"], record["modality"], bool(record.get("labeled", True)),
                   dict(record.get("label_values", {})), dict(record["normalization"]), list(record.get("flip", [])),
                   record.get("fov", 1.0), record.get("fingerprint"), record.get("split", {}).get("fold"),
                   record)  # fmt: skip


@dataclass(frozen=True)
class CacheMeta:
    """A cache's ``meta.json``, typed: what every reader of a cache asks of it. ``cases`` are the
    per-case records (files, geometry, slice plan, ``fold``, ``slice_start``, ``num_slices``) that
    validation reads; ``record`` is the whole file as written."""

    complete: bool
    fingerprint: str | None
    num_slices: int
    img_size: int
    modalities: list[str]
    class_names: list[str]
    label_sets: dict[str, list[str]]
    datasets: list[DatasetMeta]
    cases: list[dict[str, Any]]
    record: dict[str, Any]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CacheMeta:
        complete = bool(record.get("complete"))
        return cls(complete, record.get("fingerprint"), int(record.get("num_slices", 0)),
                   int(record.get("img_size", 0)), list(record.get("modalities", [])),
                   list(record.get("class_names", [])), {k: list(v) for k, v in record.get("label_sets", {}).items()},
                   [DatasetMeta.from_record(d) for d in record.get("datasets", [])] if complete else [],
                   list(record.get("cases", [])), record)  # fmt: skip

    @property
    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def dataset(self, name: str) -> DatasetMeta:
        return next(d for d in self.datasets if d.name == name)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """``meta.json``, written last: ``complete`` says that everything else is in place."""
    (folder / META).write_text(json.dumps({**meta, "format": FORMAT, "complete": True}, indent=1))


def read_meta(folder: Path) -> CacheMeta | None:
    """The cache's ``meta.json``, typed, or None where there is none (or it is unreadable)."""
    try:
        return CacheMeta.from_record(json.loads((folder / META).read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None


def build_meta(sources, pairs, checks, written, starts, stats, label_sets, vocabulary, modalities,
               fingerprints: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """``meta.json``'s content (the caller adds size, storage, fingerprint and warnings): vocabulary,
    label sets, modalities, each dataset's settings, statistics and fingerprint, each case's files,
    geometry, slice plan and fold."""
    folds = {}
    for source in sources:
        folds[source.name] = assign_folds([c.case_id for c in source.cases], source.split, str(source.root))
    cases = []
    for i, ((source, case), chk, wr) in enumerate(zip(pairs, checks, written, strict=True)):
        cases.append(
            {
                "dataset": source.name,
                "case_id": case.case_id,
                "image": str(case.image),
                "label": str(case.label) if case.label is not None else None,
                "geometry": chk["geometry"],
                "orientation": chk["orientation"],
                "spacing_zyx": list(chk["spacing"]),
                "shape_zyx": list(chk["shape"]),
                "plan": wr["plan"],
                "slice_start": int(starts[i]),
                "num_slices": int(chk["shape"][0]),
                "fold": folds[source.name][case.case_id],
            }
        )
    datasets = [
        {
            "name": s.name,
            "path": str(s.root),
            "modality": s.modality,
            "labeled": s.labeled,
            "label_values": {s.label_map.get(n, n): v for n, v in s.label_values.items()} if s.labeled else {},
            "source_label_values": s.label_values,
            "label_map": s.label_map,
            "normalization": stats[s.name],
            "flip": list(s.flip),
            "fov": s.fov,
            "fingerprint": fingerprints[s.name],
            "split": {
                "folds": s.split.folds,
                "fold": s.split.fold,
                "seed": s.split.seed,
                "group_pattern": s.split.group_pattern,
                "val": list(s.split.val) if s.split.val else None,
            },
            "num_cases": len(s.cases),
        }  # fmt: skip
        for s in sources
    ]
    return {
        "modalities": modalities,
        "class_names": vocabulary,
        "label_sets": label_sets,
        "datasets": datasets,
        "cases": cases,
    }


def write_slice_index(folder: Path, sources, pairs, written, counts, modalities) -> None:
    """``index.npz`` of the cases written by ``prepare``, in their order."""
    names = [s.name for s in sources]

    def per_slice(values, dtype) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    write_index(
        folder,
        dataset=per_slice([names.index(s.name) for s, _ in pairs], np.int16),
        modality=per_slice([modalities.index(s.modality) for s, _ in pairs], np.int16),
        labeled=per_slice([s.labeled for s, _ in pairs], bool),
        case=per_slice(range(len(pairs)), np.int32),
        z=np.concatenate([np.arange(n, dtype=np.int32) for n in counts]),
        foreground=np.concatenate([w["foreground"] for w in written]),
        scale=per_slice([w["affine"][0] for w in written], np.float32),
        offset=per_slice([w["affine"][1] for w in written], np.float32),
    )


def synthetic_cache(path: Path, slices: int, size: int = 224, datasets: int = 3) -> Path:
    """A cache of random slices in the format ``m4oe prepare`` writes (benchmarks on machines without
    the data): ``datasets`` datasets of one modality each, four classes, cases of 50 slices."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    create_arrays(path, "float16", slices, size)
    images, labels = open_arrays(path, "r+")
    for start in range(0, slices, 256):
        n = min(256, slices - start)
        images[start : start + n] = rng.standard_normal((n, size, size), dtype=np.float32)
        labels[start : start + n] = rng.integers(0, 4, (n, size, size), dtype=np.uint8)
    images.flush()
    labels.flush()
    del images, labels
    dataset = np.arange(slices) % datasets
    write_index(path, dataset=dataset, modality=dataset, labeled=np.ones(slices, bool), case=np.arange(slices) // 50,
                z=np.arange(slices) % 50, foreground=rng.random(slices), scale=np.ones(slices),
                offset=np.zeros(slices))  # fmt: skip
    classes = ["background", "a", "b", "c"]
    write_meta(path, {
        "num_slices": slices, "img_size": size, "storage": "float16",
        "modalities": [f"m{d}" for d in range(datasets)], "class_names": classes,
        "label_sets": {f"d{d}": classes for d in range(datasets)},
        "datasets": [{"name": f"d{d}", "weight": 1.0, "modality": f"m{d}", "normalization": {"scheme": "none"},
                      "label_values": {"background": 0, "a": 1, "b": 2, "c": 3}} for d in range(datasets)],
        "cases": [],
    })  # fmt: skip
    return path


def cache_fingerprint(sources: list, img_size: int, storage: str) -> str:
    """What a whole cache depends on: its format, slice size, storage and every dataset's part."""
    payload = {
        "format": FORMAT,
        "img_size": img_size,
        "storage": storage,
        "datasets": [dataset_fingerprint(s) for s in sources],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(source) -> str:
    """What a dataset's part of the cache depends on: its settings (fold and weight included) and
    the size and time of every file."""

    def stat(path: Path | None) -> list:
        if path is None:
            return []
        info = path.stat()
        return [str(path), info.st_size, info.st_mtime_ns]

    s = source
    payload = {
        "name": s.name,
        "modality": s.modality,
        "normalization": s.normalization,
        "labeled": s.labeled,
        "label_values": s.label_values,
        "label_map": s.label_map,
        # The sampling weight is read from the config when training starts; a constant stands in
        # its place so that caches prepared while it was part of the fingerprint stay valid.
        "weight": 1.0,
        "split": [s.split.folds, s.split.fold, s.split.seed, s.split.group_pattern, s.split.val],
        "cases": [[c.case_id, stat(c.image), stat(c.label)] for c in s.cases],
    }
    if s.flip:  # only when set, so that caches prepared before the option existed stay valid
        payload["flip"] = list(s.flip)
    if s.fov != 1:
        payload["fov"] = s.fov
    if s.stored_window is not None:
        payload["stored_window"] = list(s.stored_window)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
