"""The M4oE Swin-UNet: a 2D Swin-Unet whose block MLPs are mixtures of modality experts.

``image [B, 1, S, S]`` -> patch embed (4x4) -> 4 encoder stages (merging between them) ->
decoder stages (patch expanding, skip concatenation + linear) -> 4x expand -> dynamic head ->
``logits [B, K_union, S, S]``, masked to each sample's dataset label set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..config.model import register_preset
from .base import SegmentationModel, init_weights, start_from_centre_slice
from .head import DynamicHead
from .swin import PatchEmbed, PatchExpand, PatchMerging, SwinStage


class M4oEUNet(SegmentationModel):
    """M4oE Swin-UNet over a fixed set of modalities (one expert each) and dataset label sets.

    Args:
        config: architecture (see :class:`m4oe.config.ModelConfig`).
        modalities: modality names; their order defines the expert index of each.
        label_sets: dataset name -> its class names (background first); the union vocabulary is
            built from them in first-seen order.
    """

    def __init__(self, config: ModelConfig, modalities: list[str], label_sets: dict[str, list[str]]) -> None:
        super().__init__(config, modalities, label_sets)
        cfg, n = config, config.num_stages
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        grid = cfg.img_size // cfg.patch_size
        res = [grid // 2**i for i in range(n)]
        drop = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(n)]

        def stage(i: int, moe: bool) -> SwinStage:
            d = drop[starts[i] : starts[i] + cfg.depths[i]]
            return SwinStage(
                dims[i], res[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, self.mlp_factory(moe), d,
                cfg.qkv_bias,
            )  # fmt: skip

        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.encoder = nn.ModuleList(stage(i, cfg.moe_encoder) for i in range(n))
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(n - 1))
        self.norm = nn.LayerNorm(dims[-1])
        # Decoder level i (i = n-2 .. 0): expand from level i+1, concat skip, linear 2C -> C, blocks.
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], dims[i], 2) for i in range(n - 1))
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1))
        self.decoder = nn.ModuleList(stage(i, cfg.moe_decoder) for i in range(n - 1))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], cfg.patch_size)
        self.head = DynamicHead(dims[0], self.label_mask())
        self.apply(init_weights)
        start_from_centre_slice(self.patch_embed.proj, cfg.slice_context)

    @property
    def bottleneck_stride(self) -> int:
        """Pixels per bottleneck token: the patch, halved by every merge."""
        return self.config.patch_size * 2 ** (self.config.num_stages - 1)

    def embed(self, image: Tensor) -> Tensor:
        """Patch embedding: ``[B, 1, S, S]`` -> tokens ``[B, S/p, S/p, C]``."""
        return self.patch_embed(image)

    def encode_embedded(self, x: Tensor, modality, routing: str | None, gates: list | None = None):
        """Encoder from embedded tokens: returns the bottleneck tokens and the skip of every level."""
        skips = []
        for i, stage in enumerate(self.encoder):
            skips.append(x)
            x = stage(x, modality, routing, gates)
            if i < len(self.merges):
                x = self.merges[i](x)
        return self.norm(x), skips

    def encode(self, image: Tensor, modality: Tensor | None, routing: str | None, gates: list | None):
        """Encoder: returns the bottleneck tokens and the skip tensors of every level."""
        return self.encode_embedded(self.embed(image), modality, routing, gates)

    def decode(self, x: Tensor, skips: list[Tensor], modality: Tensor | None, routing: str | None, gates: list | None):
        for i in reversed(range(len(self.decoder))):
            x = self.expands[i](x)
            x = self.skip_fuse[i](torch.cat([x, skips[i]], dim=-1))
            x = self.decoder[i](x, modality, routing, gates)
        return self.final_expand(self.norm_up(x)).permute(0, 3, 1, 2)

    def forward(
        self,
        image: Tensor,
        modality: Tensor | None = None,
        dataset: Tensor | None = None,
        return_gates: bool = False,
        routing: str | None = None,
    ):
        """Segment a batch of slices.

        Args:
            image: ``[B, 1, S, S]`` normalised slices, ``S = config.img_size``.
            modality: ``[B]`` long, index into ``self.modalities`` (needed for hard routing), or one
                ``int`` for the whole batch (faster hard routing).
            dataset: ``[B]`` long, index into ``self.dataset_names``; None: no masking (the union
                vocabulary).
            return_gates: also return the gate weights of every M4oE block, ``[B, L, E]`` each.
            routing: override the configured routing mode for this call.

        Returns:
            logits ``[B, K_union, S, S]`` (classes outside each sample's label set masked), and
            when ``return_gates`` the list of per-block gate weights (encoder blocks first).
        """
        self._check_input(image, modality, dataset)
        gates: list | None = [] if return_gates else None
        x, skips = self.encode(image, modality, routing, gates)
        logits = self.head(self.decode(x, skips, modality, routing, gates), dataset)
        return (logits, gates) if return_gates else logits


# The paper's model as the published code builds it: every expert as wide as the dense MLP.
register_preset("m4oe-t", ModelConfig())
# Compute-matched experts (hidden 4C/E): total size close to the dense Swin-UNet.
register_preset("m4oe-t-lite", ModelConfig(compute_matched=True))
# The dense Swin-UNet baseline (no experts, no gate).
register_preset("swin-unet", ModelConfig(moe_encoder=False, moe_decoder=False))
# A small model for tests and CPU demos.
register_preset("tiny", ModelConfig(img_size=128, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                    window_size=4, drop_path_rate=0.0))  # fmt: skip
