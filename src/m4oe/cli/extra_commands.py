"""``m4oe demo`` and ``m4oe bench``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .base import app, console, fail, split_words


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), "--output", "-o", help="Folder for everything the demo makes."),
    quick: bool = typer.Option(False, help="A much shorter run (seconds; for CI)."),
    device: str = typer.Option(None, help="cpu or cuda."),
) -> None:
    """The whole path on shipped data: prepare, pre-train, train, predict, evaluate, overlay, experts."""
    from ..demo.run import run_demo

    console.print(
        "m4oe demo: a small m4oe-convnext-s model trained for about three minutes on 4 MRI volumes "
        "and 1 CT shipped with the package. It shows the workflow; its Dice is not a benchmark result.",
    )
    result = run_demo(out, quick=quick, device=device, say=console.print)
    table = Table(title=f"held-out MRI case, Dice ({result.seconds:.0f} s in all)")
    for name in result.dice:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    table.add_row(*(f"{v:.3f}" for v in result.dice.values()), f"{result.mean_dice:.3f}")
    console.print(table)
    console.print(f"results in {result.out}/: train/ (bundles, metrics.csv, curve.png), predictions/, "
                  f"evaluation/summary.json, {result.overlay.name}, experts/experts.png")  # fmt: skip


@app.command()
def bench(
    preset: str = typer.Option("m4oe-t", help="Comma-separated presets."),
    routing: str = typer.Option("soft", help="Comma-separated routing modes: soft, hard, uniform."),
    precision: str = typer.Option("bf16", help="Comma-separated: fp32, bf16."),
    batch: int = typer.Option(36, help="Training batch."),
    infer_batch: int = typer.Option(64, help="Inference batch."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    compile_mode: str = typer.Option(None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)."),
    attention: str = typer.Option("sdpa", help="Comma-separated window attention kernels: sdpa, explicit."),
    hard_kernel: str = typer.Option(
        "auto", help="Comma-separated kernels for hard routing of mixed batches: grouped, onehot, auto."
    ),
    experts: int = typer.Option(3, help="Number of modality experts."),
    steps: int = typer.Option(20, help="Timed steps per measurement."),
    warmup: int = typer.Option(5, help="Untimed steps first."),
    img_size: int = typer.Option(None, help="Override the preset's input size."),
    peak_tflops: float = typer.Option(None, help="The device's peak TFLOP/s, for the utilisation column."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    quick: bool = typer.Option(False, help="Tiny model, 2 steps: checks the harness (CI)."),
    train: bool = typer.Option(True, "--train/--no-train", help="Measure training (else inference only)."),
    pure_bf16: bool = typer.Option(False, help="Inference with the model cast to bf16 (no autocast)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON."),
) -> None:
    """Training/inference slices/s, peak memory, TFLOP/s; fused M4oE layer vs loop reference."""
    from dataclasses import replace

    from ..bench import HARD_KERNELS, BenchConfig, bench_model, bench_moe_layer, environment
    from ..config.choices import ATTENTION_KERNELS
    from ..files import write_json

    base = BenchConfig(batch=batch, infer_batch=infer_batch, compile=compile, compile_mode=compile_mode,
                       experts=experts, steps=steps,
                       warmup=warmup, img_size=img_size, peak_tflops=peak_tflops, train=train,
                       pure_bf16_infer=pure_bf16)  # fmt: skip
    if device:
        base = replace(base, device=device)
    if quick:
        base = replace(base, batch=4, infer_batch=4, steps=2, warmup=1)
        preset = "tiny"
    for name, values, allowed in (("attention kernel", attention, ATTENTION_KERNELS),
                                  ("hard kernel", hard_kernel, HARD_KERNELS)):  # fmt: skip
        unknown = [v for v in split_words(values) if v not in allowed]
        if unknown:
            fail(ValueError(f"{name} must be one of {', '.join(allowed)}, got {', '.join(unknown)}"))
    rows = []
    for p in split_words(preset):
        for r in split_words(routing):
            for prec in split_words(precision):
                for kernel in split_words(attention):
                    for hard in split_words(hard_kernel) if r == "hard" else ["auto"]:
                        config = replace(base, preset=p, routing=r, precision=prec, attention=kernel, hard_kernel=hard)
                        rows.append(bench_model(config))
    layer = bench_moe_layer(replace(base, precision=split_words(precision)[0]), tokens=4096 if quick else None)
    table = Table(title=f"m4oe bench on {environment(base.device).get('gpu', 'CPU')} (torch {torch_version()})")
    for col in ("preset", "routing", "precision", "attention", "compile", "train sl/s", "train GiB", "train TFLOP/s",
                "infer sl/s", "infer GiB", "infer TFLOP/s"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in rows:
        precision = "bf16 (pure)" if row["pure_bf16_infer"] else row["precision"]
        compiled = (row["compile_mode"] or "yes") if row["compile"] else "no"
        routing = f"hard ({row['hard_kernel_used']})" if row["routing"] == "hard" else row["routing"]
        cells = [row["preset"], routing, precision, row["attention"], compiled]
        for mode in ("train", "infer"):
            if f"{mode}_slices_per_s" not in row:
                cells += ["-", "-", "-"]
                continue
            cells += [
                f"{row[mode + '_slices_per_s']:.1f}",
                str(row[mode + "_peak_gib"]),
                f"{row[mode + '_tflops']:.3g}",
            ]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"M4oE layer ({layer['tokens']} tokens x {layer['dim']}, {layer['experts']} experts, fwd+bwd, "
        f"{layer['precision']}): fused {layer['fused_ms']} ms, loop reference {layer['loop_ms']} ms, "
        f"speed-up {layer['speedup']}x"
    )
    payload = {"environment": environment(base.device), "models": rows, "moe_layer": layer}
    typer.echo(json.dumps(payload))
    if json_out:
        write_json(json_out, payload)


def torch_version() -> str:
    import torch

    return torch.__version__
