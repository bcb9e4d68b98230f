"""Slices per second of the model through onnxruntime against PyTorch (fp32, CPU), soft and hard routing.

    python benchmarks/onnx_speed.py [--preset m4oe-convnext-s] [--img-size 128] [--batch 8] [--repeats 20]

The model has random weights (speed does not depend on them) with 3 modality experts and BTCV's 14
classes; both engines get the same batches, after a warm-up. Prints one JSON line per routing, with
the largest absolute logit difference between the two.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m4oe import create_model
from m4oe.bench import SYNTHETIC_CT_STATS, SYNTHETIC_LABELS, cpu_name
from m4oe.infer.onnx import OnnxSession, _Request, export_onnx


def rate(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * batch.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="m4oe-convnext-s")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    for routing in ("soft", "hard"):
        model = create_model(args.preset, modalities=["CT", "MRI", "cineMRI"], label_sets={"BTCV": SYNTHETIC_LABELS},
                             img_size=args.img_size)  # fmt: skip
        model.bundle_extra = {"datasets": {"BTCV": {"modality": "CT", "normalization": SYNTHETIC_CT_STATS}}}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            done = export_onnx(model, path, "BTCV", "CT" if routing == "hard" else None, routing)
            session = OnnxSession(path)
            request = _Request(model, 0, 0 if routing == "hard" else None).eval()
            cfg = model.config
            batch = np.random.default_rng(0).normal(size=(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size))
            batch = batch.astype(np.float32)

            def torch_run(x, request=request):
                with torch.inference_mode():
                    return request(torch.from_numpy(x))

            print(json.dumps({
                "routing": routing, "preset": args.preset, "img_size": args.img_size, "batch": args.batch,
                "torch_slices_per_s": round(rate(torch_run, batch, args.repeats), 1),
                "onnxruntime_slices_per_s": round(rate(session.run, batch, args.repeats), 1),
                "max_abs_diff": done["max_abs_diff"], "export_seconds": round(done["seconds"], 1),
                "threads": torch.get_num_threads(), "cpu": cpu_name(),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
