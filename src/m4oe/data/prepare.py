"""``m4oe prepare``: check every case, compute normalisation statistics, and write the slice cache.

The cache's files are described in :mod:`m4oe.data.cache_format` (uint8 storage, ``--storage uint8``,
keeps a per-slice affine that turns stored values back into normalised intensities).

Work happens in two passes over the cases (in parallel worker processes): pass 1 reads every case and
collects all problems (nothing is written if there is any) and the CT foreground samples; pass 2
normalises, fits and stores the slices. The cache is built in a temporary folder and renamed into
place when complete, so an interrupted run never leaves a cache that looks finished. Re-running on
unchanged inputs is a no-op (same fingerprint).
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExperimentConfig, build_vocabulary
from ..config.choices import STORAGE_TYPES
from ..files import OutputError, check_output_dir, mark_output_dir, replace_dir
from . import cache_format
from .datasets import Case, DataError, DatasetSource, open_dataset
from .intensity import histogram, intensity_records, sample_volume, to_physical
from .mirrored import mirrored_datasets
from .normalize import ct_statistics, normalize, sample_foreground, scheme_statistics


@dataclass
class PrepareResult:
    path: Path
    num_slices: int
    num_cases: int
    size_bytes: int
    up_to_date: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------


def discover(config: ExperimentConfig, problems: list[str]) -> list[DatasetSource]:
    """Open every dataset of the config; problems found are appended to ``problems``."""
    sources = [open_dataset(d, problems) for d in config.datasets]
    names = [s.name for s in sources if s is not None]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"dataset name {name!r} is used twice; give each dataset a distinct 'name'")
    for source in sources:
        if source is not None and source.split.val is not None:
            unknown = sorted(set(source.split.val) - {c.case_id for c in source.cases})
            if unknown:
                problems.append(f"{source.root}: split.val names cases that are not in the dataset: {unknown[:10]}")
    return [s for s in sources if s is not None]


# ------------------------------------------------------------------------------------------------
# pass 1: integrity check (+ foreground samples for CT statistics)
# ------------------------------------------------------------------------------------------------


def _check_case(task: dict[str, Any]) -> dict[str, Any]:
    from .io import ImageReadError, check_file, read_volume

    problems: list[str] = []
    out: dict[str, Any] = {"problems": problems}
    for path in (task["image"], task["label"]):
        if path is not None:
            problems.extend(check_file(path))
    if problems:
        return out
    try:
        image = read_volume(task["image"])
    except ImageReadError as err:
        problems.append(str(err))
        return out
    if np.issubdtype(image.array.dtype, np.floating):
        bad = int((~np.isfinite(image.array)).sum())
        if bad:
            problems.append(f"{task['image']}: {bad} NaN/Inf voxels")
    intensities = to_physical(image.array, task["window"])
    out["volume_samples"] = sample_volume(intensities, np.random.default_rng([task["seed"], 1]))
    out.update(shape=image.array.shape, spacing=image.spacing_zyx, orientation=image.orientation)
    out["geometry"] = image.geometry.to_dict()
    if task["label"] is None:
        return out
    try:
        label = read_volume(task["label"])
    except ImageReadError as err:
        problems.append(str(err))
        return out
    mismatch = image.geometry.mismatch(label.geometry)
    if label.array.shape != image.array.shape:
        problems.append(
            f"{task['label']}: shape {label.array.shape[::-1]} does not match image {task['image']} "
            f"shape {image.array.shape[::-1]} (x, y, z)"
        )
    elif mismatch:
        problems.append(f"{task['label']}: geometry differs from image {task['image']}: {mismatch}")
    values = np.unique(label.array)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        problems.append(f"{task['label']}: label values are not integers")
    else:
        unknown = sorted(set(values.astype(np.int64).tolist()) - set(task["allowed"]))
        if unknown:
            problems.append(
                f"{task['label']}: label values {unknown[:10]} are not in dataset.json "
                f"(known: {sorted(task['allowed'])})"
            )
    if task["fov"] < 1 and not problems:
        problems.extend(_outside_view(task, label.array))
    if task["sample"] and not problems:
        out["samples"] = sample_foreground(intensities, label.array, np.random.default_rng(task["seed"]))
    return out


def _outside_view(task: dict[str, Any], label: np.ndarray) -> list[str]:
    from .io import flip_in_plane
    from .resample import fov_needed, outside_view

    label = flip_in_plane(label, task["flip"])  # as cached: with an odd margin the box sits a pixel off-centre
    lost = outside_view(label, task["fov"])
    if not lost:
        return []
    return [
        f"{task['label']}: {lost} labelled voxels lie outside fov {task['fov']} of dataset {task['dataset']} "
        f"(this case needs fov >= {fov_needed(label):.3f}): raise fov or remove it from the config"
    ]


# ------------------------------------------------------------------------------------------------
# pass 2: normalise, fit, store
# ------------------------------------------------------------------------------------------------


def _write_case(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .io import flip_in_plane, read_volume
    from .resample import SlicePlan, fit_slices

    image = read_volume(task["image"])
    plan = SlicePlan.fit(image.array.shape[1:], image.spacing_zyx[1:], task["size"], task["fov"])
    normalised = normalize(flip_in_plane(to_physical(image.array, task["window"]), task["flip"]), task["stats"])
    slices = fit_slices(normalised, plan).numpy()
    if task["label"] is not None:
        label = flip_in_plane(read_volume(task["label"]).array, task["flip"]).astype(np.int64)
        lut = np.asarray(task["lut"], dtype=np.uint8)
        label_slices = fit_slices(torch.from_numpy(lut[label]), plan, is_label=True).numpy().astype(np.uint8)
    else:
        label_slices = np.zeros(slices.shape, dtype=np.uint8)
    start, count = task["start"], slices.shape[0]
    images, labels = cache_format.open_arrays(Path(task["folder"]), "r+")
    if task["storage"] == "uint8":
        lo, hi = float(slices.min()), float(slices.max())
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        images[start : start + count] = np.round((slices - lo) / scale).clip(0, 255).astype(np.uint8)
        affine = (scale, lo)
    else:
        images[start : start + count] = slices.astype(np.float16)
        affine = (1.0, 0.0)
    labels[start : start + count] = label_slices
    images.flush()
    labels.flush()
    del images, labels
    return {
        "plan": plan.to_dict(),
        "foreground": (label_slices > 0).reshape(count, -1).mean(axis=1).astype(np.float32),
        "affine": affine,
        "histogram": histogram(normalised),
    }


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _run(fn, tasks: list[dict], workers: int, desc: str, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="case", disable=None if progress else True, leave=False)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results = []
            for task in tasks:
                results.append(fn(task))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            results = []
            for result in pool.map(fn, tasks, chunksize=1):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()


def _case_tasks(sources: list[DatasetSource]) -> list[tuple[DatasetSource, Case]]:
    return [(s, c) for s in sources for c in s.cases]


def check(config: ExperimentConfig, workers: int = 2, progress: bool = True):
    """Pass 1 over every case: returns ``(sources, per-case results)`` or raises :class:`DataError`
    listing every problem found (discovery and per-case ones together)."""
    problems: list[str] = []
    sources = discover(config, problems)
    pairs = _case_tasks(sources)
    tasks = [
        {
            "image": str(case.image),
            "label": str(case.label) if case.label is not None else None,
            "allowed": sorted(source.label_values.values()),
            "sample": source.normalization == "ct" and source.labeled,
            "seed": i,
            "dataset": source.name,
            "flip": list(source.flip),
            "fov": source.fov,
            "window": source.stored_window,
        }
        for i, (source, case) in enumerate(pairs)
    ]
    present = [t for t in tasks if Path(t["image"]).is_file() and (t["label"] is None or Path(t["label"]).is_file())]
    results = _run(_check_case, present, workers, "checking", progress)
    problems += [p for r in results for p in r["problems"]]
    if problems:
        raise DataError(problems, "the integrity check failed")
    return sources, results


def _statistics(sources: list[DatasetSource], results: list[dict]) -> dict[str, dict]:
    stats, k = {}, 0
    for source in sources:
        own = results[k : k + len(source.cases)]
        k += len(source.cases)
        if source.normalization == "ct":
            try:
                stats[source.name] = ct_statistics([r["samples"] for r in own if "samples" in r])
            except ValueError as err:
                why = "every label map is empty (check labelsTr)" if source.labeled else "it has labels: none"
                raise DataError(
                    [
                        f"{source.root}: {err}: {why}; CT statistics come from labelled voxels (or use normalization: "
                        "mri or none)"
                    ]
                ) from err
        else:
            stats[source.name] = scheme_statistics(source.normalization)
        stats[source.name]["modality"] = source.modality
        if source.stored_window is not None:
            stats[source.name]["stored_window"] = list(source.stored_window)
    return stats


def prepare(
    config: ExperimentConfig,
    out: str | os.PathLike,
    img_size: int | None = None,
    storage: str = "float16",
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
    output_option: str = "-o",
) -> PrepareResult:
    """Check the config's datasets and write their slice cache to ``out``.

    ``img_size`` defaults to the config's model input size. A cache already at ``out`` with the same
    fingerprint is kept as it is (``up_to_date``), unless ``force``. ``out`` must be new, empty or
    m4oe's own cache (never a dataset or a folder of other files: see :func:`check_output_dir`);
    ``output_option`` names it in the refusal.
    """
    from ..model.presets import preset_config

    started = time.perf_counter()
    if storage not in STORAGE_TYPES:
        raise ValueError(f"storage must be one of {STORAGE_TYPES}, got {storage!r}")
    size = img_size or preset_config(config.preset, **config.model_overrides).img_size
    out = check_output_dir(out, "cache", [d.path for d in config.datasets], option=output_option)
    problems: list[str] = []
    sources = discover(config, problems)
    if problems:
        check(config, workers, progress)  # raises, listing these and every per-case problem
    fingerprint = cache_format.cache_fingerprint(sources, size, storage)
    meta = None if force else cache_format.read_meta(out)
    if meta is not None and meta.complete and meta.fingerprint == fingerprint:
        seconds = time.perf_counter() - started
        warnings = meta.record.get("warnings", [])
        return PrepareResult(out, meta.num_slices, len(meta.cases), _size(out), True, seconds, warnings)

    sources, checks = check(config, workers, progress)
    stats = _statistics(sources, checks)
    label_sets = {s.name: s.label_names for s in sources}
    vocabulary = build_vocabulary(label_sets)
    if len(vocabulary) > 255:
        raise DataError([f"{len(vocabulary)} classes in the union vocabulary; at most 255 are supported"])
    modalities = list(dict.fromkeys(s.modality for s in sources))
    pairs = _case_tasks(sources)
    counts = [r["shape"][0] for r in checks]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    total = int(starts[-1])

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OutputError(
            f"{output_option} {out}: cannot be created here ({err.strerror}); give {output_option.split()[-1]} "
            "a folder in a writable place"
        ) from None
    try:
        cache_format.create_arrays(tmp, storage, total, size)
        tasks = []
        for i, (source, case) in enumerate(pairs):
            lut = np.zeros(max(source.label_values.values()) + 1, dtype=np.int64)
            for value, name in source.value_to_name().items():
                lut[value] = vocabulary.index(name)
            tasks.append(
                {
                    "image": str(case.image),
                    "label": str(case.label) if case.label is not None else None,
                    "lut": lut.tolist(),
                    "stats": stats[source.name],
                    "flip": list(source.flip),
                    "fov": source.fov,
                    "window": source.stored_window,
                    "size": size,
                    "storage": storage,
                    "start": int(starts[i]),
                    "folder": str(tmp),
                }
            )
        written = _run(_write_case, tasks, workers, "caching", progress)
        for name, record in intensity_records(sources, checks, written).items():
            stats[name]["intensity"] = record  # travels in the bundle with the statistics
        fingerprints = {s.name: cache_format.dataset_fingerprint(s) for s in sources}
        meta = cache_format.build_meta(sources, pairs, checks, written, starts, stats, label_sets, vocabulary,
                                       modalities, fingerprints)  # fmt: skip
        meta.update(img_size=size, storage=storage, num_slices=total, fingerprint=fingerprint)
        cache_format.write_slice_index(tmp, sources, pairs, written, counts, modalities)
        index = cache_format.read_index(tmp)
        slice_dataset, foreground = index["dataset"], index["foreground"]
        labels = cache_format.open_arrays(tmp)[1]
        meta["warnings"] = mirrored_datasets(labels, slice_dataset, [s.name for s in sources], vocabulary)
        meta["warnings"] += [
            f"{s.name}: every label map is empty (background only): nothing to learn from; check {s.root}/labelsTr"
            for d, s in enumerate(sources)
            if s.labeled and not (foreground[slice_dataset == d] > 0).any()
        ]
        del labels
        cache_format.write_meta(tmp, meta)
        mark_output_dir(tmp, "cache")
        replace_dir(tmp, out, "cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(out, total, len(pairs), _size(out), False, time.perf_counter() - started, meta["warnings"])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
