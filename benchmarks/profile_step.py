"""Where the time of one training step goes: torch.profiler table of the top operators.

python benchmarks/profile_step.py [--preset m4oe-t] [--batch 36] [--precision bf16] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from m4oe.bench import BenchConfig, _autocast, _model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="m4oe-t")
    parser.add_argument("--routing", default="soft")
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    cfg = BenchConfig(preset=args.preset, routing=args.routing, precision=args.precision, batch=args.batch,
                      device=args.device)  # fmt: skip
    device = torch.device(args.device)
    model = _model(cfg).to(device).train()
    S = model.config.img_size
    image = torch.randn(args.batch, 1, S, S, device=device)
    target = torch.randint(0, cfg.classes, (args.batch, S, S), device=device)
    modality = torch.arange(args.batch, device=device) % model.num_experts
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        with _autocast(device, args.precision):
            logits = model(image, modality)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
