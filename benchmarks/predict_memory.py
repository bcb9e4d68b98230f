"""Peak memory of `m4oe predict` on large CT volumes: how it grows with the number of slices, and what
the optional outputs add.

    python benchmarks/predict_memory.py [--slices 150,600] [--size 512] [--preset m4oe-convnext-s]

Each run is the real command line in a fresh process (its peak resident memory read from the
kernel's accounting of the finished child). The bundle has random weights and BTCV's 14 classes;
the volume is a synthetic CT. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from m4oe import create_model, save_bundle
from m4oe.bench import SYNTHETIC_CT_STATS, SYNTHETIC_LABELS, cpu_name, synthetic_ct

PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="150,600")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="m4oe-convnext-s")
    parser.add_argument("--options", default=",--uncertainty", help="predict options per run, comma-separated")
    parser.add_argument("--workdir", default="/tmp/m4oe_memory_bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    model = create_model(args.preset, modalities=["CT", "MRI", "cineMRI"], label_sets={"BTCV": SYNTHETIC_LABELS})
    extra = {"datasets": {"BTCV": {"modality": "CT", "normalization": SYNTHETIC_CT_STATS}}}
    save_bundle(model, work / "bundle", extra=extra)
    for slices in map(int, args.slices.split(",")):
        volume = synthetic_ct(slices, args.size)
        image = sitk.GetImageFromArray(volume.array)
        volume.geometry.apply(image)
        scan = work / f"ct{slices}" / "case_0000.nii.gz"
        scan.parent.mkdir(parents=True)
        sitk.WriteImage(image, str(scan))
        for option in args.options.split(","):
            out = work / f"out{slices}{option.replace('-', '_')}"
            command = ["m4oe", "predict", "-m", str(work / "bundle"), "-i", str(scan), "-o", str(out),
                       "--dataset", "BTCV", *option.split()]  # fmt: skip
            started = time.perf_counter()
            peak_kb = int(subprocess.run([sys.executable, "-c", PEAK, *command], check=True, capture_output=True,
                                         text=True).stdout.split()[-1])  # fmt: skip
            seconds = time.perf_counter() - started
            voxels = slices * args.size * args.size
            print(json.dumps({"slices": slices, "size": args.size, "options": option or "(none)", "preset": args.preset,
                              "classes": len(SYNTHETIC_LABELS), "peak_mib": round(peak_kb / 1024),
                              "volume_int16_mib": round(voxels * 2 / 2**20), "seconds": round(seconds, 1),
                              "cpu": cpu_name()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
