"""End-to-end `m4oe predict` time for a 512 x 512 x 100 CT volume with `m4oe-t`: soft vs hard routing, fp32 vs bf16.

    python benchmarks/predict_cpu.py [--slices 100] [--preset m4oe-t] [--repeats 3] [--batch-size 8]

The bundle has random weights (speed does not depend on them) and CT statistics; the volume is
`predict_volume.py`'s synthetic CT in Hounsfield-like units. Each routing mode and precision
runs the real command line in a fresh process, so the time includes start-up, reading, resampling
and writing. bf16 is only fast on CPUs with bf16 instructions (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe import create_model, save_bundle
from m4oe.bench import SYNTHETIC_CT_STATS as STATS
from m4oe.bench import SYNTHETIC_LABELS as LABELS
from m4oe.bench import cpu_name, synthetic_ct
from m4oe.infer.predict import cpu_has_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--preset", default="m4oe-t")
    parser.add_argument("--workdir", default="/tmp/m4oe_predict_bench")
    parser.add_argument("--precisions", default=None, help="fp32,bf16 (default: bf16 only where the CPU has it)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each routing (medians are compared)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per forward (default: m4oe predict's)")
    args = parser.parse_args()
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if cpu_has_bf16() else [])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    volume = synthetic_ct(args.slices, 512)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.geometry.spacing)
    sitk.WriteImage(image, str(work / "ct_0000.nii.gz"))
    model = create_model(args.preset, modalities=["CT", "MRI", "cineMRI"], label_sets={"BTCV": LABELS})
    extra = {"datasets": {"BTCV": {"modality": "CT", "normalization": STATS,
                                   "label_values": {n: i for i, n in enumerate(LABELS)}}}}  # fmt: skip
    save_bundle(model, work / "bundle", extra=extra)
    results = {"preset": args.preset, "shape": [512, 512, args.slices], "cpu": cpu_name(),
               "cpu_has_bf16": cpu_has_bf16(), "cores": os.cpu_count(), "batch_size": args.batch_size}  # fmt: skip
    for precision in precisions:
        runs = {"soft": [], "hard": []}
        for _ in range(args.repeats):  # routings alternate, so a slow spell of the machine hits both
            for routing in runs:
                command = [sys.executable, "-m", "m4oe.cli", "predict", "-m", str(work / "bundle"), "-i",
                           str(work / "ct_0000.nii.gz"), "-o", str(work / f"out_{routing}_{precision}"), "--dataset",
                           "BTCV", "--modality", "CT", "--routing", routing, "--precision", precision,
                           "--device", "cpu"]  # fmt: skip
                if args.batch_size:
                    command += ["--batch-size", str(args.batch_size)]
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                runs[routing].append(round(time.perf_counter() - started, 1))
                print(f"{routing:>4} routing, {precision}: {runs[routing][-1]:6.1f} s end to end")
        for routing, seconds in runs.items():
            results[f"{routing}_{precision}_seconds"] = seconds
            results[f"{routing}_{precision}_median"] = float(np.median(seconds))
        speedup = round(results[f"soft_{precision}_median"] / results[f"hard_{precision}_median"], 2)
        results[f"hard_speedup_{precision}"] = speedup
        print(f"{precision}: hard routing is {speedup}x faster than soft (medians)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
