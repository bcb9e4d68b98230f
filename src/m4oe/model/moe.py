"""The M4oE layer: modality experts (two-layer GELU MLPs) mixed by a per-token softmax gate.

All experts are held in stacked parameters (``w1: [E, H, C]``, ``w2: [E, C, H]``) so that no
Python loop over experts or samples runs in the forward pass:

* ``soft`` / ``uniform``: the first layers of all experts are one wide GEMM ``[.., C] -> [.., E*H]``;
  because the second layer is linear, ``sum_e g_e (W2_e h_e + b2_e) = [g_1 h_1 .. g_E h_E] @ W2_cat
  + g @ b2``, a second single GEMM.
* ``hard``: each sample's tokens go through its modality's expert alone. When the whole batch shares
  one expert (inference on a scan) only that expert runs (``E`` times fewer expert FLOPs than
  ``soft``). A batch mixing modalities (phase-1 pre-training, hard-routed training) is sorted by
  expert and runs two grouped GEMMs (``torch._grouped_mm``): again only each sample's own expert, on
  the devices in ``MoEMLP.grouped_devices``; elsewhere it takes the fused path with one-hot gates.

An optional shared expert (``shared_expert``) is added to the mixture's output in every mode.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ROUTING_MODES
from .checks import check_index_range

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm multiplies


class DenseMLP(nn.Module):
    """The plain Swin MLP: ``Linear(C, H) -> GELU -> Linear(H, C)`` (the dense baseline)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, modality: Tensor | None = None, routing: str | None = None):
        return self.fc2(F.gelu(self.fc1(x))), None


class MoEMLP(nn.Module):
    """Mixture of ``num_experts`` modality experts weighed by a softmax gate over experts.

    Args:
        dim: token width ``C``.
        hidden: hidden width ``H`` of each expert.
        num_experts: ``E``, one expert per modality.
        routing: default routing mode (``soft``, ``hard`` or ``uniform``).
        gate_modality: add a learned modality embedding to the gate's input.
        closed: ``(modality, expert)`` pairs the soft gate never routes to (gate logit ``-inf``).
        shared: add a shared expert (``shared``, a :class:`DenseMLP` of the same hidden width) whose
            output every token gets unweighted, under every routing mode, beside the gated mixture.

    Shapes:
        ``x``: ``[B, L, C]``; ``modality``: ``[B]`` long (expert index of each sample, needed for
        ``hard`` routing and ``gate_modality``), or a plain ``int`` when every sample shares one
        expert (inference on one scan: ``hard`` routing then runs that expert's weights directly,
        without gathering a copy per sample). Returns ``(out [B, L, C], gates [B, L, E])``.
    """

    # Devices on which hard routing of a mixed batch uses grouped GEMMs. The CPU is tested; CUDA
    # waits for a GPU measurement against the one-hot path (``m4oe bench --hard-kernel``).
    grouped_devices: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        routing: str = "soft",
        gate_modality: bool = False,
        closed: tuple[tuple[int, int], ...] = (),
        shared: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.dim, self.hidden, self.num_experts, self.routing = dim, hidden, num_experts, routing
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.gate = nn.Linear(dim, num_experts)
        self.modality_embed = nn.Embedding(num_experts, dim) if gate_modality else None
        self.shared = DenseMLP(dim, hidden) if shared else None
        offset = None
        if closed:
            offset = torch.zeros(num_experts, num_experts)
            for m, e in closed:
                if not (0 <= m < num_experts and 0 <= e < num_experts):
                    raise ValueError(f"closed pair ({m}, {e}) out of range for {num_experts} experts")
                offset[m, e] = float("-inf")
        self.register_buffer("gate_offset", offset, persistent=False)  # [modality, expert]: 0 or -inf
        # the share of each sample's own expert mixed into the soft gates (a routing curriculum in
        # training: 1 is hard routing, 0 the learnt gate alone; see train.handover)
        self.own_share = 0.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As Swin initialises its dense MLP: truncated normal weights, zero biases.
        pairs = [(self.w1, self.b1), (self.w2, self.b2)]
        if self.shared is not None:
            pairs += [(self.shared.fc1.weight, self.shared.fc1.bias), (self.shared.fc2.weight, self.shared.fc2.bias)]
        for weight, bias in pairs:
            nn.init.trunc_normal_(weight, std=0.02)
            nn.init.zeros_(bias)
        if self.modality_embed is not None:
            nn.init.zeros_(self.modality_embed.weight)

    def extra_repr(self) -> str:
        shared = ", shared expert" if self.shared is not None else ""
        return f"dim={self.dim}, hidden={self.hidden}, experts={self.num_experts}{shared}, routing={self.routing}"

    def parameter_roles(self) -> dict[str, str]:
        """What each parameter is, by its name in this module: ``expert`` (stacked over the experts
        along dim 0), ``gate_weight`` and ``gate_bias`` (one row per expert), ``modality_embedding``
        (one row per modality). Code that grows, freezes or copies experts and gates asks this,
        rather than matching names."""
        roles = {"w1": "expert", "b1": "expert", "w2": "expert", "b2": "expert",
                 "gate.weight": "gate_weight", "gate.bias": "gate_bias"}  # fmt: skip
        if self.modality_embed is not None:
            roles["modality_embed.weight"] = "modality_embedding"
        return roles

    def gate_weights(self, x: Tensor, modality: Tensor | None) -> Tensor:
        """Softmax over experts of the gate's logits, per token: ``[B, L, E]``."""
        gate_in = x
        if self.modality_embed is not None:
            if modality is None:
                raise ValueError("gate_modality=True needs the modality of every sample")
            if isinstance(modality, int):
                gate_in = x + self.modality_embed.weight[modality]
            else:
                gate_in = x + self.modality_embed(modality)[:, None, :]
        logits = self.gate(gate_in)
        if self.gate_offset is not None:
            if modality is None:
                raise ValueError("this model closes experts to some modalities: pass the modality of every sample")
            offset = self.gate_offset[modality]
            logits = logits + (offset if isinstance(modality, int) else offset[:, None, :]).to(logits.dtype)
        return torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor, modality: Tensor | None = None, routing: str | None = None):
        out, gates = self._experts(x, modality, routing or self.routing)
        if self.shared is not None:
            out = out + self.shared(x)[0]
        return out, gates

    def _experts(self, x: Tensor, modality: Tensor | int | None, routing: str):
        """The gated modality experts' output and the gates."""
        if routing == "hard":
            return self._hard(x, modality)
        if routing == "uniform":
            gates = x.new_full((*x.shape[:-1], self.num_experts), 1.0 / self.num_experts)
        elif routing == "soft":
            gates = self.gate_weights(x, modality)
            if self.own_share > 0:
                gates = self._with_own_expert(gates, modality)
        else:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        return self._mix(x, gates), gates

    def _with_own_expert(self, gates: Tensor, modality: Tensor | int | None) -> Tensor:
        """``(1 - s) gates + s onehot(own expert)`` with ``s = own_share``."""
        if modality is None:
            raise ValueError("a routing curriculum (own_share > 0) needs the modality of every sample")
        experts = torch.arange(self.num_experts, device=gates.device)
        own = (torch.as_tensor(modality, device=gates.device).reshape(-1, 1) == experts).to(gates.dtype)
        return (1 - self.own_share) * gates + self.own_share * own[:, None, :]

    def _mix(self, x: Tensor, gates: Tensor) -> Tensor:
        E, H, C = self.num_experts, self.hidden, self.dim
        hidden = F.gelu(F.linear(x, self.w1.reshape(E * H, C), self.b1.reshape(E * H)))
        weighted = (hidden.unflatten(-1, (E, H)) * gates.unsqueeze(-1).to(hidden.dtype)).flatten(-2)
        w2_cat = self.w2.permute(1, 0, 2).reshape(C, E * H)
        return F.linear(weighted, w2_cat) + gates @ self.b2

    def _hard(self, x: Tensor, modality: Tensor | int | None):
        if modality is None:
            raise ValueError("hard routing needs the modality of every sample")
        if isinstance(modality, int):
            if not 0 <= modality < self.num_experts:
                raise ValueError(f"modality index out of range [0, {self.num_experts}): got {modality}")
            e = modality
            out = F.linear(F.gelu(F.linear(x, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])
            gates = x.new_zeros(self.num_experts)
            gates[e] = 1.0
            return out, gates.expand(*x.shape[:-1], -1)
        check_index_range("modality", modality, self.num_experts)
        # (A comparison, not F.one_hot, which reads the indices back on the CPU to check them.)
        one_hot = modality[:, None] == torch.arange(self.num_experts, device=modality.device)
        gates = one_hot.to(x.dtype)[:, None, :].expand(*x.shape[:-1], -1)
        dtype = self._compute_dtype(x)
        if x.device.type in MoEMLP.grouped_devices and self._grouped_fits(x, dtype):
            return self._grouped(x, modality, one_hot, dtype), gates
        # Otherwise the fused path with one-hot gates: every token still gets exactly its own
        # expert's output. Gathering a weight copy per sample instead was slower (measured on an
        # H200: 473 vs 543 training slices/s for m4oe-t at batch 36).
        return self._mix(x, gates), gates

    def _grouped_fits(self, x: Tensor, dtype: torch.dtype) -> bool:
        """torch._grouped_mm takes rows whose strides are multiples of 16 bytes, in fp32/bf16/fp16
        eagerly on the CPU but in bf16 only under torch.compile and on CUDA."""
        eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        allowed = GROUPED_DTYPES if eager_cpu else (torch.bfloat16,)
        size = dtype.itemsize
        return dtype in allowed and (self.dim * size) % 16 == 0 and (self.hidden * size) % 16 == 0

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def _grouped(self, x: Tensor, modality: Tensor, one_hot: Tensor, dtype: torch.dtype) -> Tensor:
        """Each sample through its own expert only: samples sorted by expert, two grouped GEMMs."""
        B, L, C = x.shape
        order = torch.argsort(modality, stable=True)
        expert = modality[order]
        # token offsets where each expert's rows end, computed on the device (no read-back)
        ends = (torch.cumsum(one_hot.sum(0), 0) * L).to(torch.int32)
        # index_select, not x[order]: its backward adds rows instead of a sorting index_put
        tokens = x.index_select(0, order).reshape(B * L, C).to(dtype)
        hidden = torch._grouped_mm(tokens, self.w1.transpose(1, 2).to(dtype), offs=ends)
        hidden = F.gelu(hidden.view(B, L, -1) + self.b1.index_select(0, expert)[:, None].to(dtype))
        out = torch._grouped_mm(hidden.view(B * L, -1), self.w2.transpose(1, 2).to(dtype), offs=ends)
        out = out.view(B, L, C) + self.b2.index_select(0, expert)[:, None].to(dtype)
        return out.index_select(0, torch.argsort(order))

    @torch.no_grad()
    def load_dense(self, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor) -> None:
        """Initialise every expert from a dense MLP's weights.

        Experts as wide as the dense MLP get a full copy each, so any convex gate mix equals the
        dense MLP. Narrower (compute-matched) experts get disjoint slices of its hidden units with
        the second layer scaled by ``E``, so the uniform mix of experts equals the dense MLP.
        """
        dense_hidden = fc1_weight.shape[0]
        if fc1_weight.shape[1] != self.dim:
            raise ValueError(f"dense MLP width {fc1_weight.shape[1]} != expert width {self.dim}")
        if dense_hidden == self.hidden:
            self.w1.copy_(fc1_weight.expand_as(self.w1))
            self.b1.copy_(fc1_bias.expand_as(self.b1))
            self.w2.copy_(fc2_weight.expand_as(self.w2))
        elif dense_hidden >= self.hidden * self.num_experts:
            used = self.hidden * self.num_experts
            self.w1.copy_(fc1_weight[:used].reshape_as(self.w1))
            self.b1.copy_(fc1_bias[:used].reshape_as(self.b1))
            w2 = fc2_weight[:, :used].reshape(self.dim, self.num_experts, self.hidden).transpose(0, 1)
            self.w2.copy_(w2 * self.num_experts)
        else:
            raise ValueError(
                f"cannot initialise {self.num_experts} experts of hidden {self.hidden} from a dense "
                f"MLP of hidden {dense_hidden}"
            )
        self.b2.copy_(fc2_bias.expand_as(self.b2))
        if self.shared is not None:  # starts silent, so that the layer's output is the dense MLP's
            nn.init.zeros_(self.shared.fc2.weight)
            nn.init.zeros_(self.shared.fc2.bias)
