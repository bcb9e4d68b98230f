"""Run the paper-style tables of docs/results.md (section 7) and print their tables (markdown).

    python experiments/run_tables.py --table A --cache CACHE_DIR --out runs/tables [--scale gpu|pilot|smoke]

Tables (at ``--scale gpu`` each is planned to fit about 12 minutes of one H100/H200, start-up and
transfer included):

* A: M4oE two-phase (pretrain + train) vs dense Swin-UNet on all data vs one Swin-UNet per modality
  vs M4oE without phase 1; per-organ validation Dice per dataset.
* B: M4oE in encoder only / decoder only / both; gate vs uniform mixing.
* C: train on CT + T2 MRI, then add cine MRI with add-modality (--freeze-old and --full): Dice on
  all three datasets before and after, parameters added, time of the addition vs training again.
* gates: mean gate weight per expert for each modality's validation slices (from table A's M4oE).
* all: A, B, C and gates in one go.

Scales: ``gpu`` is experiments/base.yaml as it stands (``m4oe-t``, 224 px, 30 x 1,440 slices);
``pilot`` is the same data, splits and comparisons with the ``tiny`` model (128 px), batch 12 and
10 x 1,440 slices, which runs on two CPU cores in about 70 minutes for all tables; ``smoke`` checks
the script in seconds. Every compared model of a scale gets the same budget (epochs x samples_per_epoch).
A run whose configuration was already trained under ``--out`` (e.g. table B's "encoder + decoder,
gate", which is table A's "M4oE without phase 1") is reused, not trained again.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from m4oe.config import load_experiment
from m4oe.files import write_json, write_text

BASE = Path(__file__).with_name("base.yaml")
DATASETS = ["BTCV", "CHAOS", "ACDC"]
DATA: Path | None = None  # --data: where the Dataset00X folders are (default: as base.yaml says)
SCALES: dict[str, dict] = {
    "gpu": {"model": {}, "train": {}},
    "pilot": {
        "model": {"preset": "tiny"},
        # batch 12 and lr 3e-3: a from-scratch Swin needs steps more than slices (and batch 12 runs 1.6x
        # more slices/s than 36 on two cores); batch 36, lr 2e-3, 240 steps ended at 5.5 % mean Dice
        "train": {
            "epochs": 10,
            "samples_per_epoch": 1440,
            "batch_size": 12,
            "lr": 3e-3,
            "warmup_epochs": 0.5,
            "pretrain_epochs": 5,
            "pretrain_lr": 1e-3,
            "val_every": 10,
            "workers": 2,
        },  # fmt: skip
    },
    "smoke": {
        "model": {"preset": "tiny", "img_size": 64, "window_size": 2, "embed_dim": 16, "num_heads": [1, 2, 2, 4]},
        "train": {
            "epochs": 1,
            "samples_per_epoch": 16,
            "pretrain_epochs": 1,
            "batch_size": 4,
            "val_every": 1,
            "workers": 0,
        },  # fmt: skip
    },
}
DENSE = {"moe_encoder": False, "moe_decoder": False}  # the Swin-UNet baseline: the same net without experts


def experiment(scale: str, model: dict | None = None, train: dict | None = None, datasets: list[str] | None = None):
    exp = load_experiment(BASE)
    settings = {**exp.train, **SCALES[scale]["train"], **(train or {})}
    model_cfg = {**exp.model, **SCALES[scale]["model"], **(model or {})}
    chosen = tuple(d for d in exp.datasets if datasets is None or d.name in datasets)
    if DATA is not None:
        chosen = tuple(replace(d, path=str(DATA / Path(d.path).name)) for d in chosen)
    return replace(exp, model=model_cfg, train=settings, datasets=chosen)


class Runs:
    """Trains each named configuration once under ``out/runs`` and remembers its time and speed."""

    def __init__(self, cache: Path, out: Path, scale: str):
        self.cache, self.root, self.scale = cache, out / "runs", scale

    def _once(self, name: str, work) -> tuple[Path, dict]:
        """Run ``work(run)`` -> (training slices, extra record fields) unless ``name`` already ran."""
        run = self.root / name
        timing = run / "timing.json"
        if timing.is_file():
            return run, json.loads(timing.read_text())
        started = time.perf_counter()
        slices, extra = work(run)
        seconds = time.perf_counter() - started
        record = {"seconds": round(seconds, 1), "slices": slices, "slices_per_s": round(slices / seconds, 1), **extra}
        write_json(timing, record)
        return run, record

    def train(self, name: str, model: dict | None = None, train: dict | None = None,
              datasets: list[str] | None = None, init: str | None = None) -> tuple[Path, dict]:  # fmt: skip
        from m4oe.train.finetune import run_train

        exp = experiment(self.scale, model, train, datasets)

        def work(run: Path):
            histories = run_train(exp, run, self.cache, init=self.root / init if init else None, progress=False)
            return sum(row["step"] for h in histories.values() for row in h.rows[-1:]) * exp.training.batch_size, {}

        return self._once(name, work)

    def pretrain(self, name: str) -> tuple[Path, dict]:
        from m4oe.train.pretrain import run_pretrain

        exp = experiment(self.scale)

        def work(run: Path):
            return run_pretrain(exp, run, self.cache, progress=False).rows[-1]["step"] * exp.training.batch_size, {}

        return self._once(name, work)

    def add_modality(self, name: str, base: str, mode: str, datasets: list[str]) -> tuple[Path, dict, int]:
        from m4oe.train.add_modality import run_add_modality

        exp = experiment(self.scale, datasets=datasets)

        def work(run: Path):
            history, info = run_add_modality(self.root / base / "last", exp, run, self.cache, mode, progress=False)
            slices = history.rows[-1]["step"] * exp.training.batch_size
            return slices, {"parameters_added": info["parameters_added"]["total"]}

        run, record = self._once(name, work)
        return run, record, record["parameters_added"]


def validation(run: Path) -> dict:
    return json.loads((run / "validation.json").read_text())


def dice_tables(rows: dict[str, tuple[Path, dict]]) -> list[str]:
    """One markdown table per dataset: a row per model, a column per structure, the mean last."""
    lines: list[str] = []
    for dataset in DATASETS:
        present = {name: validation(run) for name, (run, _) in rows.items() if dataset in validation(run)["dice"]}
        if not present:
            continue
        organs = list(next(iter(present.values()))["dice"][dataset])
        lines += [f"**{dataset}** (validation DSC %)", "",
                  "| model | " + " | ".join(organs) + " | mean | train time | slices/s |",
                  "|---|" + "---:|" * (len(organs) + 3)]  # fmt: skip
        for name, result in present.items():
            timing = rows[name][1]
            cells = " | ".join(f"{100 * result['dice'][dataset][o]:.1f}" for o in organs)
            mean = 100 * result["dataset_mean_dice"][dataset]
            lines.append(f"| {name} | {cells} | **{mean:.1f}** | {timing['seconds']:.0f} s | "
                         f"{timing['slices_per_s']:.0f} |")  # fmt: skip
        lines.append("")
    return lines


def table_a(runs: Runs) -> list[str]:
    # trained cheapest comparison first, so a run cut short by a device's time limit keeps M4oE, its dense
    # twin and the per-modality models, and loses only the two-phase row
    no_phase1, dense = runs.train("m4oe"), runs.train("dense", DENSE)
    per, record = runs.train("dense_per_modality", DENSE, {"baseline": "per_modality"})
    _, pre = runs.pretrain("m4oe_pretrain")
    run, fine = runs.train("m4oe_two_phase", init="m4oe_pretrain")
    seconds = pre["seconds"] + fine["seconds"]
    two_phase = {**fine, "seconds": seconds, "slices_per_s": (pre["slices"] + fine["slices"]) / seconds}
    rows = {"M4oE two-phase (MAE + gated fine-tuning)": (run, two_phase),
            "M4oE without phase 1": no_phase1, "Swin-UNet, all data": dense}  # fmt: skip
    for modality in ("CT", "MRI", "cineMRI"):
        share = {**record, "seconds": record["seconds"] / 3}
        rows[f"Swin-UNet, one per modality ({modality})"] = (per / modality, share)
    return dice_tables(rows)


def table_b(runs: Runs) -> list[str]:
    return dice_tables({
        "encoder + decoder, gate": runs.train("m4oe"),
        "encoder only, gate": runs.train("m4oe_encoder_only", {"moe_decoder": False}),
        "decoder only, gate": runs.train("m4oe_decoder_only", {"moe_encoder": False}),
        "encoder + decoder, uniform (no gate)": runs.train("m4oe_uniform", train={"routing": "uniform"}),
    })  # fmt: skip


def table_c(runs: Runs) -> list[str]:
    rows = {"CT + MRI model (before)": runs.train("m4oe_ct_mri", datasets=["BTCV", "CHAOS"])}
    for mode, datasets in (("freeze_old", ["ACDC"]), ("full", DATASETS)):
        run, record, added = runs.add_modality(f"add_cine_{mode}", "m4oe_ct_mri", mode, datasets)
        rows[f"+ cine MRI, --{mode.replace('_', '-')} (+{added / 1e6:.2f} M params)"] = (run, record)
    rows["all three trained from scratch"] = runs.train("m4oe")
    return dice_tables(rows)


def gate_table(runs: Runs) -> list[str]:
    run = runs.root / "m4oe_two_phase"
    if not (run / "validation.json").is_file():
        raise SystemExit(f"the gate table reads table A's M4oE run, which is not in {run}: run --table A first")
    result = validation(run)
    modalities = list(result["gates"])
    lines = ["| validation slices of | " + " | ".join(f"expert {m}" for m in modalities) + " |",
             "|---|" + "---:|" * len(modalities)]  # fmt: skip
    for modality, per_block in result["gates"].items():
        means = [sum(block[e] for block in per_block) / len(per_block) for e in range(len(per_block[0]))]
        lines.append(f"| {modality} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


def prepare_cache(cache: Path, scale: str) -> None:
    """The whole cache first: every run then uses a subset of it as it is."""
    from m4oe.data.prepare import prepare
    from m4oe.model.presets import preset_config

    full = experiment(scale)
    if not all(Path(d.path).is_dir() for d in full.datasets) and (cache / "meta.json").is_file():
        print(f"raw data not here: using the cache {cache} as it is")
        return
    prepare(full, cache, img_size=preset_config(full.preset, **full.model_overrides).img_size, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["A", "B", "C", "gates", "all"], required=True)
    parser.add_argument("--cache", type=Path, required=True, help="slice cache of experiments/base.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    parser.add_argument("--smoke", action="store_const", const="smoke", dest="scale", help="= --scale smoke")
    parser.add_argument("--data", type=Path, help="folder holding the Dataset00X folders (default: base.yaml's)")
    args = parser.parse_args()
    global DATA
    DATA = args.data
    started = time.perf_counter()
    if args.table != "gates":
        prepare_cache(args.cache, args.scale)
    runs = Runs(args.cache, args.out, args.scale)
    makers = {"A": table_a, "B": table_b, "C": table_c, "gates": gate_table}
    for table in makers if args.table == "all" else [args.table]:
        lines = makers[table](runs)
        print(f"table {table} ({time.perf_counter() - started:.0f} s so far)\n" + "\n".join(lines), flush=True)
        write_text(args.out / f"table_{table}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
