"""The optimiser and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float, schedule: str = "cosine"):
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine (or nnU-Net's
    polynomial ``(1 - progress)^0.9``) down to ``min_lr``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = min_lr / base_lr
        decay = (1 - progress) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * decay

    return factor


def build_optimizer(params: list, no_decay: list, config, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or Nesterov SGD, momentum 0.99, as nnU-Net) over ``params``; those in ``no_decay`` get
    no weight decay. Fused: one kernel for all parameters, no read-back of the step count."""
    fused = device.type in ("cuda", "cpu")
    exempt = {id(p) for p in no_decay}
    groups = [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def build_scheduler(optimizer, config, lr: float, total_steps: int, steps_per_epoch: int):
    """The learning rate per step: warm-up over ``warmup_epochs``, then the config's decay to ``min_lr``."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    factor = lr_lambda(total_steps, warmup, lr, config.min_lr, config.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
