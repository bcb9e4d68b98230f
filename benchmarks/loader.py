"""Training data loader throughput: slices/s read from a slice cache, with and without augmentation.

    python benchmarks/loader.py --cache CACHE_DIR [--batch 36] [--workers 2] [--batches 60]

Prints a table and one JSON line. Build the cache first, e.g.
``m4oe prepare configs/btcv_chaos_acdc.yaml -o cache/btcv_chaos_acdc``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from m4oe.data.augment import AugmentConfig, augment_batch
from m4oe.data.cache_format import synthetic_cache
from m4oe.data.loader import BalancedBatchSampler, SliceCache, make_loader


def measure(cache: SliceCache, batch: int, workers: int, batches: int, augment: bool, device: str) -> float:
    sampler = BalancedBatchSampler(cache, batch, samples_per_epoch=batch * (batches + 5), seed=0)
    loader = make_loader(cache, sampler, workers=workers, pin_memory=device == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    config = AugmentConfig(elastic_prob=0.2)
    seen, started = 0, None
    for i, item in enumerate(loader):
        if i == 5:  # workers started and prefetching: start the clock
            started, seen = time.perf_counter(), 0
        image = item["image"].to(device, non_blocking=True)
        label = item["label"].to(device, non_blocking=True)
        if augment:
            image, label = augment_batch(image, label, config, generator)
        seen += image.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a cache written by m4oe prepare")
    parser.add_argument("--synthetic", type=int, default=0, help="instead, build a random cache of N slices")
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.synthetic:
        args.cache = str(synthetic_cache(Path(tempfile.mkdtemp()) / "cache", args.synthetic))
    elif not args.cache:
        parser.error("give --cache DIR or --synthetic N")
    cache = SliceCache(args.cache)
    result = {
        "cache": args.cache,
        "img_size": cache.img_size,
        "storage": cache.meta["storage"],
        "batch": args.batch,
        "workers": args.workers,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
    for augment in (False, True):
        key = "slices_per_s_augmented" if augment else "slices_per_s_read"
        result[key] = round(measure(cache, args.batch, args.workers, args.batches, augment, args.device), 1)
    print(f"loader ({cache.img_size}px {result['storage']}, batch {args.batch}, {args.workers} workers, {args.device})")
    print(f"  read only        : {result['slices_per_s_read']:8.1f} slices/s")
    print(f"  read + augment   : {result['slices_per_s_augmented']:8.1f} slices/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
