"""What every M4oE backbone shares: modalities (one expert each), label sets and the union
vocabulary, the dynamic head's mask, routing control, input checks and the block-MLP factory.

A backbone subclasses :class:`SegmentationModel` and provides ``embed`` (image -> channels-last
features at the first level), ``encode_embedded`` (-> bottleneck ``[B, g, g, C]`` and skips),
``bottleneck_stride`` (pixels per bottleneck cell, the unit of phase-1 masking) and ``forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, build_vocabulary
from .checks import check_index_range
from .layers import make_mlp_factory


class SegmentationModel(nn.Module):
    """Base of the M4oE segmentation models.

    Args:
        config: architecture (see :class:`m4oe.config.ModelConfig`).
        modalities: modality names; their order defines the expert index of each.
        label_sets: dataset name -> its class names (background first); the union vocabulary is
            built from them in first-seen order.
    """

    # parameter-name prefixes of the encoder (copied from a phase-1 model by ``load_pretrained``)
    encoder_prefixes: tuple[str, ...] = ("patch_embed.", "encoder.", "merges.", "norm.")

    def __init__(self, config: ModelConfig, modalities: list[str], label_sets: dict[str, list[str]]) -> None:
        super().__init__()
        self.config = config
        self.modalities = list(modalities)
        self.label_sets = {name: list(labels) for name, labels in label_sets.items()}
        self.class_names = build_vocabulary(self.label_sets)
        self.dataset_names = list(self.label_sets)
        self._check_names()
        if any(max(pair) >= len(self.modalities) for pair in config.closed_experts):
            raise ConfigError(f"closed_experts {config.closed_experts} name experts beyond the modalities {modalities}")

    def _check_names(self) -> None:
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and unique, got {self.modalities}")
        if not self.label_sets:
            raise ValueError("label_sets must name at least one dataset")
        for name, labels in self.label_sets.items():
            if not labels or labels[0] != "background" or len(set(labels)) != len(labels):
                raise ValueError(
                    f"label set of dataset {name!r} must start with 'background' and have unique names, got {labels}"
                )

    def mlp_factory(self, moe: bool):
        """``dim -> module``: the block MLP, an M4oE layer (``moe``) or the dense MLP."""
        cfg = self.config
        return make_mlp_factory(
            cfg.mlp_ratio,
            len(self.modalities),
            moe,
            cfg.compute_matched,
            cfg.routing,
            cfg.gate_modality,
            cfg.closed_experts,
            cfg.matched_experts,
            cfg.shared_expert,
        )

    def label_mask(self) -> Tensor:
        index = {c: k for k, c in enumerate(self.class_names)}
        mask = torch.zeros(len(self.label_sets), len(self.class_names), dtype=torch.bool)
        for d, labels in enumerate(self.label_sets.values()):
            mask[d, [index[c] for c in labels]] = True
        return mask

    @property
    def num_experts(self) -> int:
        return len(self.modalities)

    def moe_parameter_roles(self) -> dict[str, str]:
        """Full parameter name -> role (see :meth:`MoEMLP.parameter_roles`) for every M4oE layer."""
        from .moe import MoEMLP

        roles = {}
        for prefix, module in self.named_modules():
            if isinstance(module, MoEMLP):
                roles.update({f"{prefix}.{name}": role for name, role in module.parameter_roles().items()})
        return roles

    def gate_names(self) -> list[str]:
        """Names of the M4oE blocks in the order their gates are returned (``enc{stage}.{block}``, then
        ``dec{level}.{block}`` as the decoder runs, deepest level first)."""
        names = []
        for i, stage in enumerate(self.encoder):
            names += [f"enc{i}.{j}" for j, block in enumerate(stage.blocks) if hasattr(block.mlp, "gate")]
        for i in reversed(range(len(self.decoder))):
            names += [f"dec{i}.{j}" for j, block in enumerate(self.decoder[i].blocks) if hasattr(block.mlp, "gate")]
        return names

    def expert_parameter_names(self) -> set[str]:
        return {name for name, role in self.moe_parameter_roles().items() if role == "expert"}

    def gate_parameter_names(self) -> set[str]:
        """The gates' weights and biases and the modality embeddings (what soft routing alone trains)."""
        return {name for name, role in self.moe_parameter_roles().items() if role != "expert"}

    def set_own_share(self, share: float) -> None:
        """Mix each sample's own expert into every soft gate by ``share`` (0: the gate alone; a
        routing curriculum hands over from 1 to 0 during training)."""
        for module in self.modules():
            if hasattr(module, "own_share"):
                module.own_share = float(share)

    def set_routing(self, routing: str) -> None:
        """Change the routing mode of every M4oE layer (e.g. ``hard`` for fast inference)."""
        self.config = self.config.replace(routing=routing)
        for module in self.modules():
            if hasattr(module, "routing"):
                module.routing = routing

    def _check_input(self, image: Tensor, modality: Tensor | int | None, dataset: Tensor | None) -> None:
        if torch.compiler.is_compiling():  # shapes and types are checked in eager runs
            return
        S, C = self.config.img_size, self.config.in_chans
        if image.ndim != 4 or image.shape[1] != C or image.shape[2:] != (S, S):
            raise ValueError(f"expected image of shape [B, {C}, {S}, {S}], got {list(image.shape)}")
        if isinstance(modality, int) and not 0 <= modality < self.num_experts:
            raise ValueError(f"modality index out of range [0, {self.num_experts}): {modality}")
        for name, ids, count in (("modality", modality, self.num_experts), ("dataset", dataset, len(self.label_sets))):
            if ids is None or isinstance(ids, int):
                continue
            if ids.shape != (image.shape[0],) or ids.dtype != torch.long:
                raise ValueError(
                    f"{name} must be a long tensor of shape [{image.shape[0]}], got {ids.dtype} {list(ids.shape)}"
                )
            check_index_range(name, ids, count)


def start_from_centre_slice(stem: nn.Conv2d, context: int) -> None:
    """2.5D input (``context`` neighbours on each side): zero the stem's weights on the neighbour
    channels, so that a new model computes what its 2D twin computes and learns from there what the
    neighbours add. (Every stem is followed by a norm, so the centre weights keep their own scale.)"""
    if context == 0:
        return
    with torch.no_grad():
        neighbours = [c for c in range(stem.in_channels) if c != context]
        stem.weight[:, neighbours] = 0


def init_weights(module: nn.Module, layers: tuple[type[nn.Module], ...] = (nn.Linear,), he: bool = False) -> None:
    """Initialise one module (``model.apply``): weights of ``layers`` truncated normal with std 0.02
    (Swin, ConvNeXt) or, with ``he``, He normal (nnU-Net); zero biases; LayerNorms the identity."""
    if isinstance(module, layers):
        if he:
            nn.init.kaiming_normal_(module.weight, a=1e-2)
        else:
            nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
