"""Where training runs: the device, and the process group when ``torchrun`` starts several processes
(DistributedDataParallel; gloo on a CPU, NCCL on GPUs), with the collective helpers the loop needs."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..devices import resolve_device, uses_bf16


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str | None = None) -> Runtime:
    """Device and process group (when started by ``torchrun``: WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = wanted
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local_rank)


def autocast_factory(device: torch.device, amp: str):
    if not uses_bf16(amp, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def gather_state(state: Tensor, runtime: Runtime) -> list[Tensor]:
    if not runtime.distributed:
        return [state]
    states = [None] * runtime.world
    dist.all_gather_object(states, state)
    return states


def all_mean(value: Tensor, runtime: Runtime) -> Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= runtime.world
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
