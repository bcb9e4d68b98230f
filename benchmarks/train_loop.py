"""The real training loop's throughput: ``fit`` as ``m4oe train`` runs it, on a synthetic cache.

    python benchmarks/train_loop.py [--preset m4oe-t] [--batch 36] [--steps 150] [--workers 8]
    python benchmarks/train_loop.py --preset tiny --batch 4 --steps 6 --workers 0   # quick (128 px)

``m4oe bench`` times the model alone (forward, loss, backward, SGD). This times everything a training
step of ``m4oe train`` does: loading and pinning the batch, augmentation on the device, the task's
cross-entropy + Dice loss, AdamW, gradient clipping, the learning-rate schedule and the loop's
bookkeeping, with ``torch.compile`` and bf16 autocast as ``m4oe train`` sets them on the device.
Two epochs run; the first includes compilation, the second is the figure. Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from m4oe import create_model
from m4oe.config import ConfigError, TrainConfig, apply_overrides
from m4oe.data.cache_format import synthetic_cache
from m4oe.data.loader import SliceCache
from m4oe.train.finetune import SegmentationTask
from m4oe.train.loop import fit, setup_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="m4oe-t")
    parser.add_argument("--img-size", type=int, default=None, help="model input size (default: the preset's)")
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--steps", type=int, default=150, help="steps per epoch")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--routing", default="soft")
    parser.add_argument("--compile", default="auto", help="auto (on for CUDA) | on | off")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="model.KEY=VALUE",
        help="model config overrides as m4oe train --set words (e.g. model.depths=[1,1,2,2,2])",
    )
    args = parser.parse_args()
    runtime = setup_runtime(args.device)
    overrides = {"img_size": args.img_size} if args.img_size else {}
    try:
        values = apply_overrides({}, args.set)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    if set(values) - {"model"}:
        raise SystemExit(f"--set: only model.KEY=VALUE words apply here, got sections {sorted(values)}")
    overrides.update({k: tuple(v) if isinstance(v, list) else v for k, v in values.get("model", {}).items()})
    work = Path(tempfile.mkdtemp())
    probe = create_model(args.preset, modalities=["m0"], label_sets={"d0": ["background", "a"]}, **overrides)
    size = probe.config.img_size
    cache = SliceCache(synthetic_cache(work / "cache", max(2000, 4 * args.batch), size=size))
    model = create_model(args.preset, modalities=cache.modalities, label_sets=cache.label_sets, **overrides)
    task = SegmentationTask(model, cache, args.routing, 1.0, 1.0, runtime.device)
    config = TrainConfig(batch_size=args.batch, samples_per_epoch=args.batch * args.steps, workers=args.workers,
                         compile=args.compile, val_every=0, warmup_epochs=0.1)  # fmt: skip
    started = time.perf_counter()
    history = fit(task, cache, config, work / "run", runtime, epochs=2, lr=5e-4, sampler_mask=None, progress=False)
    first, second = history.rows
    result = {"preset": args.preset, "img_size": size, "batch": args.batch, "steps_per_epoch": args.steps,
              "routing": args.routing, "device": str(runtime.device), "compile": config.compile,
              "workers": args.workers, "epoch1_slices_per_s": first["slices_per_s"],
              "slices_per_s": second["slices_per_s"], "loss": [first["loss"], second["loss"]],
              "total_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if runtime.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"training loop: {result['slices_per_s']} slices/s (epoch 1, with compilation: {first['slices_per_s']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
