"""Run the experiments of docs/results.md and print their tables (markdown).

    python experiments/run_tables.py --table A --cache CACHE_DIR --out runs/tables [--smoke]

Tables (each planned to fit about 12 minutes of one H100/H200, start-up and transfer included):

* A: M4oE two-phase (pretrain + train) vs dense Swin-UNet on all data vs one Swin-UNet per modality
  vs M4oE without phase 1; per-organ validation Dice per dataset.
* B: M4oE in encoder only / decoder only / both; gate vs uniform mixing.
* C: train on CT + T2 MRI, then add cine MRI with add-modality (--freeze-old and --full): Dice on
  all three datasets before and after, parameters added, time of the addition vs training again.
* gates: mean gate weight per expert for each modality's validation slices (from table A's M4oE).

Every model gets the same budget (train.epochs x train.samples_per_epoch of experiments/base.yaml).
``--smoke`` shrinks everything (tiny model, a few steps) to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from m4oe.config import load_experiment

BASE = Path(__file__).with_name("base.yaml")
DATA: Path | None = None  # --data: where the Dataset00X folders are (default: as base.yaml says)
SMOKE = {"epochs": 1, "samples_per_epoch": 16, "pretrain_epochs": 1, "batch_size": 4, "val_every": 1, "workers": 0}


def experiment(model: dict | None = None, train: dict | None = None, datasets: list[str] | None = None,
               smoke: bool = False):  # fmt: skip
    exp = load_experiment(BASE)
    settings = {**exp.train, **(train or {}), **(SMOKE if smoke else {})}
    model_cfg = {**exp.model, **(model or {})}
    if smoke:
        model_cfg = {"preset": "tiny", "img_size": 64, "window_size": 2, "embed_dim": 16, "num_heads": [1, 2, 2, 4],
                     **{k: v for k, v in (model or {}).items() if k != "preset"}}  # fmt: skip
    chosen = tuple(d for d in exp.datasets if datasets is None or d.name in datasets)
    if DATA is not None:
        chosen = tuple(replace(d, path=str(DATA / Path(d.path).name)) for d in chosen)
    return replace(exp, model=model_cfg, train=settings, datasets=chosen)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def last_validation(run: Path) -> dict:
    return json.loads((run / "validation.json").read_text())


def dice_rows(name: str, validation: dict, datasets: list[str]) -> list[str]:
    rows = []
    for dataset in datasets:
        organs = validation["dice"].get(dataset)
        if organs is None:
            continue
        cells = " | ".join(f"{100 * v:.1f}" for v in organs.values())
        mean = 100 * validation["dataset_mean_dice"][dataset]
        rows.append(f"| {name} | {dataset} | {cells} | **{mean:.1f}** |")
    return rows


def run_a(cache: Path, out: Path, smoke: bool) -> list[str]:
    from m4oe.train.finetune import run_train
    from m4oe.train.pretrain import run_pretrain

    lines, runs = [], {}
    _, t_pre = timed(run_pretrain, experiment(smoke=smoke), out / "m4oe_pre", cache, progress=False)
    _, t = timed(run_train, experiment(smoke=smoke), out / "m4oe", cache, init=out / "m4oe_pre", progress=False)
    runs["M4oE two-phase"] = (out / "m4oe", t_pre + t)
    _, t = timed(run_train, experiment(smoke=smoke), out / "m4oe_scratch", cache, progress=False)
    runs["M4oE without phase 1"] = (out / "m4oe_scratch", t)
    _, t = timed(run_train, experiment({"preset": "swin-unet"}, smoke=smoke), out / "dense", cache, progress=False)
    runs["Swin-UNet, all data"] = (out / "dense", t)
    per = experiment({"preset": "swin-unet"}, {"baseline": "per_modality"}, smoke=smoke)
    _, t = timed(run_train, per, out / "per_modality", cache, progress=False)
    for modality in ("CT", "MRI", "cineMRI"):
        runs[f"Swin-UNet per modality ({modality})"] = (out / "per_modality" / modality, t / 3)
    for name, (run, seconds) in runs.items():
        validation = last_validation(run)
        lines += dice_rows(f"{name} [{seconds:.0f} s]", validation, ["BTCV", "CHAOS", "ACDC"])
    return lines


def run_b(cache: Path, out: Path, smoke: bool) -> list[str]:
    from m4oe.train.finetune import run_train

    variants = {
        "encoder + decoder, gate": ({}, {}),
        "encoder only, gate": ({"moe_decoder": False}, {}),
        "decoder only, gate": ({"moe_encoder": False}, {}),
        "encoder + decoder, uniform (no gate)": ({}, {"routing": "uniform"}),
    }
    lines = []
    for name, (model, train) in variants.items():
        run = out / name.replace(" ", "_").replace(",", "").replace("+", "and").replace("(", "").replace(")", "")
        _, t = timed(run_train, experiment(model, train, smoke=smoke), run, cache, progress=False)
        lines += dice_rows(f"{name} [{t:.0f} s]", last_validation(run), ["BTCV", "CHAOS", "ACDC"])
    return lines


def run_c(cache: Path, out: Path, smoke: bool) -> list[str]:
    from m4oe.train.add_modality import run_add_modality
    from m4oe.train.finetune import run_train

    base = experiment(datasets=["BTCV", "CHAOS"], smoke=smoke)
    _, t_base = timed(run_train, base, out / "ct_mri", cache, progress=False)
    lines = dice_rows(f"CT + MRI model [{t_base:.0f} s]", last_validation(out / "ct_mri"), ["BTCV", "CHAOS"])
    for mode in ("freeze_old", "full"):
        names = ["ACDC"] if mode == "freeze_old" else ["BTCV", "CHAOS", "ACDC"]
        new = experiment(datasets=names, smoke=smoke)
        (_, info), t = timed(run_add_modality, out / "ct_mri" / "last", new, out / f"add_{mode}", cache, mode,
                             progress=False)  # fmt: skip
        added = info["parameters_added"]["total"]
        label = f"+ cine MRI, {mode} [{t:.0f} s, +{added / 1e6:.2f} M params]"
        lines += dice_rows(label, last_validation(out / f"add_{mode}"), ["BTCV", "CHAOS", "ACDC"])
    _, t_all = timed(run_train, experiment(smoke=smoke), out / "all_again", cache, progress=False)
    lines += dice_rows(f"all three trained again [{t_all:.0f} s]", last_validation(out / "all_again"),
                       ["BTCV", "CHAOS", "ACDC"])  # fmt: skip
    return lines


def gate_table(out: Path) -> list[str]:
    validation = last_validation(out / "m4oe")
    lines = []
    for modality, per_block in validation["gates"].items():
        experts = len(per_block[0])
        means = [sum(block[e] for block in per_block) / len(per_block) for e in range(experts)]
        lines.append(f"| {modality} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["A", "B", "C", "gates"], required=True)
    parser.add_argument("--cache", type=Path, required=True, help="slice cache of experiments/base.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--data", type=Path, help="folder holding the Dataset00X folders (default: base.yaml's)")
    args = parser.parse_args()
    global DATA
    DATA = args.data
    out = args.out / f"table_{args.table}"
    started = time.perf_counter()
    if args.table != "gates":  # the whole cache first: every run then uses a subset of it as it is
        from m4oe.data.prepare import prepare
        from m4oe.model.presets import preset_config

        full = experiment(smoke=args.smoke)
        size = preset_config(full.preset, **full.model_overrides).img_size
        if not all(Path(d.path).is_dir() for d in full.datasets) and (args.cache / "meta.json").is_file():
            print(f"raw data not here: using the cache {args.cache} as it is")
        else:
            prepare(full, args.cache, img_size=size, progress=False)
    if args.table == "A":
        lines = run_a(args.cache, out, args.smoke)
    elif args.table == "B":
        lines = run_b(args.cache, out, args.smoke)
    elif args.table == "C":
        lines = run_c(args.cache, out, args.smoke)
    else:
        lines = gate_table(args.out / "table_A")
    print(f"table {args.table}: {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    (args.out / f"table_{args.table}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
