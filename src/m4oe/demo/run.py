"""The end-to-end demo: prepare, two-phase training of ``m4oe-convnext-s``, predict, evaluate, pictures.

It uses only the data shipped in ``m4oe/demo/data`` (four CHAOS T2 MRI volumes, CC BY-SA 4.0, and
the TotalSegmentator example CT, CC BY 4.0). One CHAOS case is held out and scored. It is a demo:
a small model trained for about three minutes on five volumes (96 px, batches of 4), not a result to
compare with anything.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..files import check_output_dir, folder_kind, mark_output_dir, write_text

DATA = Path(__file__).parent / "data"
HELD_OUT = "chaos_21"

RECIPE = Path(__file__).parent / "demo.yaml"
QUICK = ["model.img_size=64", "model.depths=[0,1,1,1]", "train.epochs=2", "train.samples_per_epoch=48",
         "train.val_every=2"]  # fmt: skip


@dataclass
class DemoResult:
    out: Path
    dice: dict[str, float]
    mean_dice: float
    seconds: float
    overlay: Path
    experts: Path


def demo_config(out: Path, quick: bool, overrides: list[str] | None = None) -> Path:
    """The demo's recipe (``demo.yaml``, with ``--quick``'s and any further ``--set`` words) written to
    ``OUT/demo.yaml``, its dataset paths made absolute."""
    from ..config import apply_overrides

    values = yaml.safe_load(RECIPE.read_text())
    for entry in values["datasets"]:
        entry["path"] = str(RECIPE.parent / entry["path"])
    values = apply_overrides(values, [*(QUICK if quick else []), *(overrides or [])])
    return write_text(out / "demo.yaml", yaml.safe_dump(values, sort_keys=False))


def run_demo(out: str | Path = "demo_output", quick: bool = False, device: str | None = None, say=print,
             overrides: list[str] | None = None) -> DemoResult:  # fmt: skip
    from ..bundle import load_bundle
    from ..config import load_experiment
    from ..eval.evaluate import evaluate_folders
    from ..infer.files import predict_paths
    from ..infer.predict import Predictor
    from ..train.finetune import run_train
    from ..train.pretrain import run_pretrain
    from ..viz.experts import render_experts
    from ..viz.overlay import overlay_files

    started = time.perf_counter()
    out = check_output_dir(out, "demo")  # never a folder of the user's files: the runs below are removed
    for previous in ("pretrain", "train"):  # a rerun of the demo starts its runs afresh
        if folder_kind(out / previous) == "run":
            shutil.rmtree(out / previous)
    mark_output_dir(out, "demo")
    experiment = load_experiment(demo_config(out, quick, overrides))
    cache = out / "cache"
    chaos = DATA / "Dataset801_CHAOS_T2_demo"
    ct = DATA / "Dataset802_TotalSegCT_demo"

    say("1/6 pre-training the experts (phase 1, masked autoencoder) ...")
    run_pretrain(experiment, out / "pretrain", cache, device=device)
    say("2/6 fine-tuning with the gate (phase 2) ...")
    run_train(experiment, out / "train", cache, init=out / "pretrain", device=device)

    say("3/6 predicting the held-out MRI case and the CT ...")
    best = out / "train" / ("best" if (out / "train" / "best").exists() else "last")
    predictor = Predictor(load_bundle(best), device)
    predictions = out / "predictions"
    mri_image = chaos / "imagesTr" / f"{HELD_OUT}_0000.nii.gz"
    predict_paths(predictor, [mri_image], predictions, dataset="CHAOS", progress=False, overwrite=True)
    predict_paths(predictor, [ct / "imagesTr" / "tsct_001_0000.nii.gz"], predictions, dataset="TotalSegCT",
                  progress=False, overwrite=True)  # fmt: skip

    say("4/6 evaluating the held-out case ...")
    reference = out / "reference"
    reference.mkdir(exist_ok=True)
    shutil.copy(chaos / "labelsTr" / f"{HELD_OUT}.nii.gz", reference / f"{HELD_OUT}.nii.gz")
    only_mri = out / "predictions_mri"
    only_mri.mkdir(exist_ok=True)
    shutil.copy(predictions / f"{HELD_OUT}.nii.gz", only_mri / f"{HELD_OUT}.nii.gz")
    summary = evaluate_folders(reference, only_mri, chaos / "dataset.json", out / "evaluation" / "summary.json",
                               workers=1)  # fmt: skip

    say("5/6 drawing the overlay ...")
    names = {int(k): v for k, v in summary["label_names"].items()}
    overlay = overlay_files(mri_image, out / "overlay.png", reference / f"{HELD_OUT}.nii.gz",
                            predictions / f"{HELD_OUT}.nii.gz", names)  # fmt: skip
    say("6/6 drawing the expert maps ...")
    render_experts(predictor, mri_image, out / "experts", dataset="CHAOS")
    dice = {summary["label_names"][k]: v["Dice"] for k, v in summary["mean"].items()}
    return DemoResult(out, dice, summary["foreground_mean"]["Dice"], time.perf_counter() - started, overlay,
                      out / "experts" / "experts.png")  # fmt: skip
