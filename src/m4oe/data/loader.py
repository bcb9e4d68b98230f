"""Reading the slice cache and sampling mixed-modality training batches.

* :class:`SliceCache` opens a cache folder written by ``m4oe prepare`` (memory-mapped arrays).
* :class:`BalancedBatchSampler` draws whole epochs of batch indices at once with numpy: datasets by
  weight (balanced by default, so a small MRI set is not drowned by CT), and within a dataset a
  fraction of foreground slices (oversampling, as nnU-Net does). Epochs are reproducible from
  ``(seed, epoch)`` and can start at any batch, which is what resuming a run needs.
* :class:`SliceBatches` turns one array of slice indices into a batch: one fancy-indexing read of
  the memmap per batch, no per-sample Python work.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.choices import FOREGROUND_SAMPLING
from . import cache_format
from .datasets import DataError


class SliceCache:
    """A prepared slice cache: ``meta.json``, ``index.npz`` and memory-mapped ``images``/``labels``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / cache_format.META
        if not meta_path.is_file():
            raise DataError([f"{self.path}: no meta.json; run 'm4oe prepare' first"], "not a slice cache")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())  # as written
        if not self.meta.get("complete"):
            raise DataError([f"{meta_path}: cache is incomplete; run 'm4oe prepare' again"], "not a slice cache")
        self.info = cache_format.CacheMeta.from_record(self.meta)  # typed: what readers ask of it
        self.index = cache_format.read_index(self.path)
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.info.num_slices

    def __getstate__(self) -> dict:  # memmaps are reopened in each worker process
        return {**self.__dict__, "_images": None, "_labels": None}

    @property
    def img_size(self) -> int:
        return self.info.img_size

    @property
    def modalities(self) -> list[str]:
        return list(self.info.modalities)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def label_sets(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.info.label_sets.items()}

    @property
    def dataset_names(self) -> list[str]:
        return self.info.dataset_names

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._check_unchanged()
            self._images, self._labels = cache_format.open_arrays(self.path)
        return self._images, self._labels

    def _check_unchanged(self) -> None:
        """The files must be those this cache's index describes: a cache rebuilt after it was
        opened (loader workers open the arrays later) would be read with a stale index."""
        try:
            now = json.loads((self.path / cache_format.META).read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            now = None
        if now != self.info.fingerprint:
            raise DataError(
                [f"{self.path}: the cache was rebuilt or removed while this run was reading it; start the run again"],
                "stale slice cache",
            )

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised images ``[n, S, S]`` float32 and labels ``[n, S, S]`` uint8 of some slices."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._read_images(indices), self._read(self._open()[1], indices)

    def read_context(self, indices: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[n, 1 + 2k, S, S]`` of some slices, each with its ``k = context`` neighbours of the
        same case on either side in z order (zero beyond the case, as :func:`stack_slice_context`
        pads a volume), and the labels ``[n, S, S]`` of the slices themselves."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = np.arange(-context, context + 1)
        near = np.clip(indices[:, None] + offsets, 0, len(self) - 1)  # [n, 1 + 2k]
        case, z = self.index["case"], self.index["z"]
        inside = (case[near] == case[indices][:, None]) & (z[near] == z[indices][:, None] + offsets)
        images = self._read_images(near.ravel()).reshape(*near.shape, self.img_size, self.img_size)
        images[~inside] = 0.0
        return images, self._read(self._open()[1], indices)

    def _read_images(self, indices: np.ndarray) -> np.ndarray:
        stored = self._read(self._open()[0], indices).astype(np.float32)
        return stored * self.index["scale"][indices][:, None, None] + self.index["offset"][indices][:, None, None]

    @staticmethod
    def _read(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")  # sequential reads, then back to the asked order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return np.asarray(array[indices[order]][inverse])

    def slice_classes(self, indices: np.ndarray, chunk: int = 512) -> np.ndarray:
        """``[n, K]`` bool: which classes of the vocabulary appear in each of some slices."""
        indices = np.asarray(indices, dtype=np.int64)
        K = len(self.class_names)
        present = np.zeros((indices.size, K), dtype=bool)
        for start in range(0, indices.size, chunk):
            labels = self._read(self._open()[1], indices[start : start + chunk]).reshape(-1, self.img_size**2)
            rows = np.arange(labels.shape[0])[:, None] * K  # one bincount for the whole chunk
            counts = np.bincount((rows + labels).ravel(), minlength=labels.shape[0] * K)
            present[start : start + labels.shape[0]] = counts.reshape(-1, K) > 0
        return present

    def slice_mask(self, split: str = "train") -> np.ndarray:
        """Slices of the ``train`` or ``val`` cases (validation fold of each dataset), or ``all``."""
        if split == "all":
            return np.ones(len(self), dtype=bool)
        val_case = np.array(
            [c["fold"] == self.info.dataset(c["dataset"]).validation_fold for c in self.info.cases], dtype=bool
        )
        per_slice = val_case[self.index["case"]]
        if split == "val":
            return per_slice
        if split == "train":
            return ~per_slice
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")

    @property
    def dataset_modality(self) -> dict[str, str]:
        """Dataset name -> the modality (expert) it belongs to."""
        return {d.name: d.modality for d in self.info.datasets}

    def dataset_mask(self, names: list[str]) -> np.ndarray:
        """Slices of the named datasets."""
        return np.isin(self.index["dataset"], [self.dataset_names.index(n) for n in names])

    def cases(self, split: str = "all") -> list[dict[str, Any]]:
        """Case records (with ``slice_start`` / ``num_slices``) of a split."""
        mask = self.slice_mask(split)
        return [c for c in self.info.cases if c["num_slices"] and mask[c["slice_start"]]]


ENDLESS_CHUNK = 256  # batches drawn at a time by an endless epoch (a run with a time budget)


class BalancedBatchSampler:
    """Epochs of batches of slice indices, balanced over datasets, with foreground oversampling.

    Args:
        cache: the slice cache.
        batch_size: slices per batch.
        mask: eligible slices (e.g. ``cache.slice_mask("train")``); default all.
        samples_per_epoch: slices drawn per epoch (default: the number of eligible slices).
        dataset_weights: relative probability of each dataset, in the cache's order (default:
            balanced datasets; training passes the config's ``weight``s).
        foreground_fraction: share of samples forced to come from slices with foreground.
        foreground_sampling: how a forced sample is drawn: ``any``, a slice with any foreground;
            ``class``, a foreground class of its dataset drawn uniformly, then a slice that holds it
            (nnU-Net's oversampling: a small organ such as the gallbladder is drawn as often as the
            liver, not only as often as the slices that show it).
        seed: base seed; epoch ``e`` is drawn from ``(seed, e)``.
    """

    def __init__(
        self,
        cache: SliceCache,
        batch_size: int,
        mask: np.ndarray | None = None,
        samples_per_epoch: int | None = None,
        dataset_weights: list[float] | None = None,
        foreground_fraction: float = 0.33,
        foreground_sampling: str = "any",
        seed: int = 0,
    ) -> None:
        if foreground_sampling not in FOREGROUND_SAMPLING:
            raise ValueError(f"foreground_sampling must be one of {FOREGROUND_SAMPLING}, got {foreground_sampling!r}")
        mask = np.ones(len(cache), dtype=bool) if mask is None else mask
        dataset = cache.index["dataset"]
        held = len(cache.info.datasets)
        weights = dataset_weights or [1.0] * held
        if len(weights) != held:
            raise ValueError(f"{len(weights)} dataset weights for a cache of {held} datasets")
        self.pools, self.fg_pools, self.class_pools, kept = [], [], [], []
        for d, weight in enumerate(weights):
            pool = np.flatnonzero(mask & (dataset == d))
            if pool.size == 0:
                continue
            fg = pool[cache.index["foreground"][pool] > 0]
            self.pools.append(pool)
            self.fg_pools.append(fg if fg.size else pool)
            # per dataset, the slices holding each of its foreground classes (none: draw from fg as a whole)
            present = cache.slice_classes(fg)[:, 1:] if foreground_sampling == "class" else np.zeros((0, 0), bool)
            self.class_pools.append([fg[present[:, k]] for k in range(present.shape[1]) if present[:, k].any()])
            kept.append(weight)
        if not self.pools:
            raise DataError([f"{cache.path}: no slices to sample from"], "empty training set")
        self.probs = np.asarray(kept, dtype=np.float64) / np.sum(kept)
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch or int(mask.sum())
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self.part = slice(None)
        self.endless = False  # set by a run with a time budget: epochs end where the run says

    def __len__(self) -> int:
        return max(1, self.samples_per_epoch // self.batch_size)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All batches of an epoch, ``[len(self), batch_size]`` slice indices."""
        return self._draw(np.random.default_rng([self.seed, epoch]), len(self))

    def _draw(self, rng: np.random.Generator, batches: int) -> np.ndarray:
        """``batches`` batches of slice indices, ``[batches, batch_size]``, drawn from ``rng``."""
        n = batches * self.batch_size
        which = rng.choice(len(self.pools), size=n, p=self.probs)
        force_fg = rng.random(n) < self.foreground_fraction
        picks = np.empty(n, dtype=np.int64)
        for d, (pool, fg) in enumerate(zip(self.pools, self.fg_pools, strict=True)):
            for use_fg, source in ((False, pool), (True, fg)):
                sel = (which == d) & (force_fg == use_fg)
                if use_fg and self.class_pools[d]:
                    picks[sel] = self._by_class(self.class_pools[d], int(sel.sum()), rng)
                else:
                    picks[sel] = source[rng.integers(0, source.size, int(sel.sum()))]
        return picks.reshape(batches, self.batch_size)

    @staticmethod
    def _by_class(class_pools: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` slices, each of a class drawn uniformly and then a slice uniformly among that class's."""
        which = rng.integers(0, len(class_pools), n)
        picks = np.empty(n, dtype=np.int64)
        for k, source in enumerate(class_pools):
            sel = which == k
            picks[sel] = source[rng.integers(0, source.size, int(sel.sum()))]
        return picks

    def shard(self, rank: int, world: int) -> None:
        """Yield only this process's contiguous share of every batch (data-parallel training)."""
        if self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {world} processes")
        share = self.batch_size // world
        self.part = slice(rank * share, (rank + 1) * share)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.endless:  # a run with a time budget decides where each epoch ends
            yield from self._endless()
            return
        for batch in self.epoch_batches(self.epoch)[self.start_batch :]:
            yield batch[self.part]

    def _endless(self) -> Iterator[np.ndarray]:
        """Batches of the epoch without end, drawn ``ENDLESS_CHUNK`` at a time from ``(seed, epoch)``:
        the same epoch and start batch give the same batches (a resumed run continues exactly)."""
        rng, index = np.random.default_rng([self.seed, self.epoch]), 0
        while True:
            for batch in self._draw(rng, ENDLESS_CHUNK):
                if index >= self.start_batch:
                    yield batch[self.part]
                index += 1


def stack_slice_context(slices: torch.Tensor, context: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The model input of a volume's slices ``[Z, S, S]``: ``[n, 1 + 2k, S, S]`` for the slices
    ``start:stop`` (default all), each with its ``k = context`` neighbours on either side in z order,
    zero beyond the volume (``[n, 1, S, S]`` for ``k = 0``)."""
    Z = slices.shape[0]
    stop = Z if stop is None else min(stop, Z)
    if context == 0:
        return slices[start:stop].unsqueeze(1)
    lo, hi = max(start - context, 0), min(stop + context, Z)
    before = slices.new_zeros(lo - (start - context), *slices.shape[1:])
    after = slices.new_zeros(stop + context - hi, *slices.shape[1:])
    padded = torch.cat([before, slices[lo:hi], after])  # slices start - k ... stop + k - 1
    return torch.stack([padded[i : i + stop - start] for i in range(2 * context + 1)], dim=1)


class SliceBatches(torch.utils.data.Dataset):
    """Map-style dataset whose "index" is a whole array of slice indices: one read per batch. With
    ``context`` each image is the slice between its neighbours (:meth:`SliceCache.read_context`)."""

    def __init__(self, cache: SliceCache, context: int = 0) -> None:
        self.cache, self.context = cache, context
        self.dataset = torch.from_numpy(cache.index["dataset"].astype(np.int64))
        self.modality = torch.from_numpy(cache.index["modality"].astype(np.int64))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        images, labels = self.cache.read_context(indices, self.context)
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {
            "image": torch.from_numpy(images),
            "label": torch.from_numpy(labels.astype(np.int64)),
            "modality": self.modality[idx],
            "dataset": self.dataset[idx],
            "index": idx,
        }


def make_loader(
    cache: SliceCache,
    sampler: BalancedBatchSampler,
    workers: int = 2,
    pin_memory: bool = False,
    context: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ready batches from the cache (``workers`` processes prefetching), each
    image with ``context`` neighbouring slices on either side (the model's ``slice_context``)."""
    return torch.utils.data.DataLoader(
        SliceBatches(cache, context),
        sampler=sampler,
        batch_size=None,
        generator=torch.Generator().manual_seed(0),  # leave the global RNG (drop path) untouched
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
