"""The ``--device`` option: ``cpu`` or ``cuda`` (default: cuda when a GPU is there), checked up front."""

from __future__ import annotations

import torch

from .config import ConfigError


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` (one of :data:`~m4oe.config.choices.PRECISIONS`) runs bf16 on ``device``:
    ``bf16`` always, ``auto`` on a CUDA GPU only, ``fp32`` never. Training and prediction both ask here."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; anything else, or a GPU that is not
    there, is a one-line :class:`ConfigError` naming the option."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, number = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (number and not number.isdigit()):
        raise ConfigError(f"--device {device!r}: use cpu or cuda (cuda:N for one of several GPUs)")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if number and int(number) >= count:
            raise ConfigError(f"--device {device}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
    return torch.device(device)
