"""``m4oe bench``: training and inference speed, memory and FLOP rate of a model configuration.

Training is timed as forward + loss + backward + SGD step (the work of the published figures), with
synthetic slices of the model's input size and a mixed-modality batch; inference as a no-grad
forward. In the same run the M4oE layer is timed against a plain loop over experts (the reference
the tests check it against), so the layer's speed-up is a ratio from one run on one machine.
No image IO is imported here: the benchmark runs where only PyTorch is installed.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config.choices import HARD_KERNELS
from .model.moe import MoEMLP
from .model.presets import create_model, forward_flops
from .model.swin import WindowAttention, set_attention_kernel


@dataclass
class BenchConfig:
    preset: str = "m4oe-t"
    routing: str = "soft"
    precision: str = "bf16"  # fp32 | bf16
    batch: int = 36
    infer_batch: int = 64
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
    attention: str = "sdpa"  # window attention kernel: sdpa | explicit
    hard_kernel: str = "auto"  # hard routing of mixed batches: grouped | onehot | auto (the device's default)
    experts: int = 3
    classes: int = 14
    steps: int = 20
    warmup: int = 5
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    img_size: int | None = None
    train: bool = True
    pure_bf16_infer: bool = False  # inference with bf16 weights and activations (no autocast)
    peak_tflops: float | None = None  # the card's bf16 (or fp32) peak, for the utilisation column


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _model(cfg: BenchConfig):
    modalities = ["CT", "MRI", "cineMRI", "PET", "US", "XR"][: cfg.experts]
    labels = {"data": ["background"] + [f"class_{k}" for k in range(1, cfg.classes)]}
    overrides: dict[str, Any] = {"routing": cfg.routing}
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    return create_model(cfg.preset, modalities=modalities, label_sets=labels, **overrides)


def bench_model(cfg: BenchConfig) -> dict[str, Any]:
    """Training and inference slices/s, peak memory and achieved TFLOP/s of one configuration."""
    previous, grouped = WindowAttention.kernel, MoEMLP.grouped_devices
    device = torch.device(cfg.device).type
    set_attention_kernel(cfg.attention)
    if cfg.hard_kernel == "grouped":
        MoEMLP.grouped_devices = grouped | {device}
    elif cfg.hard_kernel == "onehot":
        MoEMLP.grouped_devices = grouped - {device}
    elif cfg.hard_kernel not in HARD_KERNELS:
        raise ValueError(f"hard kernel must be grouped, onehot or auto, got {cfg.hard_kernel!r}")
    try:
        result = _bench_model(cfg)
        result["hard_kernel_used"] = "grouped" if device in MoEMLP.grouped_devices else "onehot"
        return result
    finally:
        set_attention_kernel(previous)
        MoEMLP.grouped_devices = grouped


def _bench_model(cfg: BenchConfig) -> dict[str, Any]:
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    model = _model(cfg)
    flops = forward_flops(model)
    model = model.to(device)
    S, E = model.config.img_size, model.num_experts
    result: dict[str, Any] = {**asdict(cfg), "params": sum(p.numel() for p in model.parameters()),
                              "gflops_forward": round(flops / 1e9, 3)}  # fmt: skip
    if model.config.routing != "soft":
        gates = model.gate_parameter_names()
        for name, p in model.named_parameters():
            if name in gates:
                p.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    image = torch.randn(cfg.batch, model.config.in_chans, S, S, device=device)
    target = torch.randint(0, cfg.classes, (cfg.batch, S, S), device=device)
    modality = torch.arange(cfg.batch, device=device) % E
    dataset = torch.zeros(cfg.batch, dtype=torch.long, device=device)
    forward = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model

    def train_step() -> None:
        with _autocast(device, cfg.precision):
            logits = forward(image, modality, dataset)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if cfg.train:
        model.train()
        _reset_peak(device)
        seconds = _timed(train_step, cfg.steps, cfg.warmup, device)
        result["train_slices_per_s"] = round(cfg.batch / seconds, 1)
        result["train_peak_gib"] = _peak(device)
        result["train_tflops"] = _significant(3 * flops * cfg.batch / seconds / 1e12)  # backward ~ 2x forward

    model.eval()
    infer_image = torch.randn(cfg.infer_batch, model.config.in_chans, S, S, device=device)
    infer_modality = 0 if cfg.routing == "hard" else torch.arange(cfg.infer_batch, device=device) % E
    precision = cfg.precision
    if cfg.pure_bf16_infer:
        model.to(torch.bfloat16)
        infer_image, precision = infer_image.to(torch.bfloat16), "fp32"  # no autocast: already bf16

    def infer_step() -> None:
        with torch.inference_mode(), _autocast(device, precision):
            forward(infer_image, infer_modality)

    optimizer.state.clear()  # free the momentum buffers before measuring inference memory
    model.zero_grad(set_to_none=True)
    _reset_peak(device)
    seconds = _timed(infer_step, cfg.steps, cfg.warmup, device)
    result["infer_slices_per_s"] = round(cfg.infer_batch / seconds, 1)
    result["infer_peak_gib"] = _peak(device)
    result["infer_tflops"] = _significant(flops * cfg.infer_batch / seconds / 1e12)
    if cfg.peak_tflops:
        if cfg.train:
            result["train_fraction_of_peak"] = round(result["train_tflops"] / cfg.peak_tflops, 4)
        result["infer_fraction_of_peak"] = round(result["infer_tflops"] / cfg.peak_tflops, 4)
    return result


def _significant(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits: a slow CPU's 0.004 TFLOP/s must not print as 0."""
    return float(f"{value:.{digits}g}")


def loop_reference(layer: MoEMLP, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The M4oE layer as a plain loop over experts (what a straightforward implementation does)."""
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        hidden = F.gelu(F.linear(x, layer.w1[e], layer.b1[e]))
        out = out + gates[..., e : e + 1] * F.linear(hidden, layer.w2[e], layer.b2[e])
    return out


def bench_moe_layer(cfg: BenchConfig, tokens: int | None = None, dim: int = 96) -> dict[str, Any]:
    """Forward + backward time of the fused M4oE layer vs the loop reference, first-stage shape."""
    device = torch.device(cfg.device)
    tokens = tokens or cfg.batch * 56 * 56
    layer = MoEMLP(dim, 4 * dim, cfg.experts).to(device)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)

    def fast() -> None:
        with _autocast(device, cfg.precision):
            out, _ = layer(x, None, "soft")
        out.float().sum().backward()

    def reference() -> None:
        with _autocast(device, cfg.precision):
            gates = layer.gate_weights(x, None)
            out = loop_reference(layer, x, gates)
        out.float().sum().backward()

    t_fast = _timed(fast, cfg.steps, cfg.warmup, device)
    t_ref = _timed(reference, cfg.steps, cfg.warmup, device)
    return {"tokens": tokens, "dim": dim, "experts": cfg.experts, "precision": cfg.precision,
            "fused_ms": round(t_fast * 1e3, 3), "loop_ms": round(t_ref * 1e3, 3),
            "speedup": round(t_ref / t_fast, 2)}  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = cpu_name()
        info["threads"] = str(torch.get_num_threads())
    return info


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None


# A synthetic CT scan for the prediction benchmarks (benchmarks/predict_*.py): BTCV's 14 classes and CT
# statistics; the speed and memory of prediction do not depend on the anatomy or the weights.
SYNTHETIC_LABELS = ["background"] + [f"organ_{k}" for k in range(1, 14)]
SYNTHETIC_CT_STATS = {"scheme": "ct", "clip": [-125.0, 275.0], "mean": 60.0, "std": 50.0}


def synthetic_ct(slices: int, size: int):
    """A ``size x size x slices`` CT-like volume (int16, Hounsfield-like units), 0.8 x 0.8 x 2.5 mm."""
    import numpy as np

    from .data.io import Geometry, Volume

    array = np.random.default_rng(0).normal(40, 30, (slices, size, size)).astype(np.int16)
    array[:, :, : size // 8] = -1000  # air beside the body
    geometry = Geometry((0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return Volume(array, geometry, "LPS", (2.5, 0.8, 0.8))
