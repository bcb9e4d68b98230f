"""Seconds to segment one scan in memory with ``Predictor.predict_volume``, and where they go.

    python benchmarks/predict_volume.py [--preset m4oe-t] [--slices 100] [--size 512] [--routing soft,hard]
    python benchmarks/predict_volume.py --preset tiny --slices 4 --size 64 --device cpu   # quick

Everything ``m4oe predict`` does to a volume except reading and writing the file: normalising,
fitting the slices to the model input, the batched forward, resampling the logits back to the
slice grid, the argmax and the label numbers. No image-IO library is imported, so this runs on the
GPU machine as it is. Besides the whole call it times its two parts alone: the host-side
preparation (normalise + fit) and the model on the fitted slices. The rest of the call is moving
data and resampling. The model has random weights (speed does not depend on them); the volume is
a synthetic CT in Hounsfield-like units. Prints a table line per routing and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from m4oe import create_model
from m4oe.bench import SYNTHETIC_CT_STATS, SYNTHETIC_LABELS, synthetic_ct
from m4oe.data.io import Volume
from m4oe.infer.predict import Predictor

LABELS, STATS = SYNTHETIC_LABELS, SYNTHETIC_CT_STATS


def best_of(repeats: int, run, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(predictor: Predictor, volume: Volume, repeats: int) -> dict:
    device, dtype, batch = predictor.device, predictor.dtype, predictor.batch_size
    shape = volume.array.shape

    def prepare():
        return predictor.prepare(volume, STATS)[0]

    slices = prepare()

    @torch.no_grad()
    def forward():
        for start in range(0, slices.shape[0], batch):
            predictor.model(slices[start : start + batch].unsqueeze(1).to(device, dtype), 0)

    def whole():
        return predictor.predict_volume(volume, "BTCV", "CT")

    labels = whole().labels  # warm-up, and a check that the call returns the whole volume
    assert labels.shape == shape, labels.shape
    row = {"routing": predictor.model.config.routing, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
           "batch": batch, "seconds": round(best_of(repeats, whole, device), 3),
           "prepare_seconds": round(best_of(repeats, prepare, device), 3),
           "model_seconds": round(best_of(repeats, forward, device), 3)}  # fmt: skip
    row["slices_per_s"] = round(shape[0] / row["seconds"], 1)
    row["rest_seconds"] = round(row["seconds"] - row["prepare_seconds"] - row["model_seconds"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="m4oe-t")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the scan")
    parser.add_argument("--routing", default="soft,hard")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: Predictor's (16 GPU, 8 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up; the best is kept")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    volume = synthetic_ct(args.slices, args.size)
    model = create_model(args.preset, modalities=["CT", "MRI", "cineMRI"], label_sets={"BTCV": LABELS})
    model.bundle_extra = {"datasets": {"BTCV": {"modality": "CT", "normalization": STATS}}}
    results = {"preset": args.preset, "shape": [args.size, args.size, args.slices], "rows": []}
    for routing in args.routing.split(","):
        row = measure(Predictor(model, args.device, args.batch_size, routing=routing, precision=args.precision),
                      volume, args.repeats)  # fmt: skip
        results["rows"].append(row)
        print(f"{routing:>4} {row['dtype']:>8} batch {row['batch']:>3}: {row['seconds']:7.3f} s per volume "
              f"({row['slices_per_s']} slices/s): prepare {row['prepare_seconds']} s, model {row['model_seconds']} s, "
              f"resample + argmax + copies {row['rest_seconds']} s")  # fmt: skip
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
