"""Layers every backbone shares: stochastic depth and the block MLP (dense or M4oE) factory."""

from __future__ import annotations

from torch import Tensor, nn

from .moe import DenseMLP, MoEMLP


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def make_mlp_factory(
    mlp_ratio: float,
    num_experts: int,
    moe: bool,
    compute_matched: bool,
    routing: str,
    gate_modality: bool,
    closed: tuple[tuple[int, int], ...] = (),
    matched_experts: int = 0,
    shared_expert: bool = False,
):
    """A function ``dim -> nn.Module`` building the MLP of a block (dense or M4oE). Compute-matched
    experts are sized for ``matched_experts`` experts (0: ``num_experts``)."""

    def make(dim: int) -> nn.Module:
        hidden = int(dim * mlp_ratio)
        if not moe:
            return DenseMLP(dim, hidden)
        if compute_matched:
            hidden = max(1, round(hidden / (matched_experts or num_experts)))
        return MoEMLP(
            dim, hidden, num_experts, routing=routing, gate_modality=gate_modality, closed=closed, shared=shared_expert
        )

    return make
