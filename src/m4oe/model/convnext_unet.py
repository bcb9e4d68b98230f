"""The M4oE ConvNeXt U-Net: a 2D convolutional U-Net whose blocks' pointwise MLPs are M4oE layers.

Each block is ConvNeXt / MedNeXt style: depthwise ``k x k`` convolution, LayerNorm over channels, then
a pointwise two-layer MLP, which is the M4oE layer (one expert per modality, a softmax gate per
pixel) or, in the dense twin, a plain MLP. Unlike the Swin-UNet's 4x4 patches, the first level works
at full resolution (a 3x3 convolutional stem), so the decoder ends on full-resolution skip features,
and small decoder heads give deep supervision at 1/2 and 1/4 resolution while training.

``image [B, 1, S, S]`` -> stem (3x3) -> level 0 blocks (S) -> [down (3x3, stride 2) -> level i blocks
(S / 2^i, width C0 * 2^i)] ... -> decoder: up (2x2 transposed conv), concat skip, linear 2C -> C,
blocks -> dynamic head -> ``logits [B, K_union, S, S]``.

Features are kept channels-last (``[B, H, W, C]``) between layers, as in the Swin-UNet, so the M4oE
layer, the gate and the dynamic head are the same modules as there.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..config.model import register_preset
from .base import SegmentationModel, init_weights, start_from_centre_slice
from .head import DynamicHead
from .layers import DropPath


class InstanceNormLast(nn.Module):
    """Instance normalisation (per sample and channel, over the pixels, as nnU-Net and MedNeXt
    normalise) of channels-last ``[B, H, W, C]`` features, with a learned affine per channel."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=(1, 2), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def make_norm(kind: str, dim: int) -> nn.Module:
    return InstanceNormLast(dim) if kind == "instance" else nn.LayerNorm(dim)


class ConvNeXtBlock(nn.Module):
    """``x + MLP(Norm(DWConv(x)))`` on ``[B, H, W, C]``, the MLP dense or an M4oE layer."""

    def __init__(
        self, dim: int, kernel: int, mlp: nn.Module, drop_path: float = 0.0, norm: str = "layer", depthwise: bool = True
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim if depthwise else 1)
        self.norm = make_norm(norm, dim)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, modality: Tensor | int | None, routing: str | None):
        B, H, W, C = x.shape
        # a [B, H, W, C] tensor permuted to [B, C, H, W] is a channels-last view: no copy
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out, gates = self.mlp(self.norm(y).reshape(B, H * W, C), modality, routing)
        return x + self.drop_path(out.view(B, H, W, C)), gates


class ConvStage(nn.Module):
    """A run of ConvNeXt blocks at one resolution (``.blocks``, like a Swin stage)."""

    def __init__(
        self, dim: int, depth: int, kernel: int, make_mlp, drop_path: list[float], norm: str = "layer",
        depthwise: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, kernel, make_mlp(dim), drop_path[i], norm, depthwise) for i in range(depth)
        )

    def forward(self, x: Tensor, modality, routing: str | None, gates: list | None) -> Tensor:
        for block in self.blocks:
            x, block_gates = block(x, modality, routing)
            if gates is not None and block_gates is not None:
                gates.append(block_gates)
        return x


class Resample(nn.Module):
    """A strided convolution to another level's width (``conv``: 3x3 stride 2 down, 2x2 transposed
    stride 2 up), then norm and GELU, on channels-last features.

    The non-linearity keeps the path between levels non-linear while the blocks' residual branches
    are still small: on CHAOS (2,400 slices, 128 px, lr 1e-2) validation Dice 0.28 with it, 0.24
    with ConvNeXt's plain norm + convolution."""

    def __init__(self, conv: nn.Module, out_dim: int, norm: str = "layer") -> None:
        super().__init__()
        self.norm = make_norm(norm, out_dim)
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))


class ConvUnit(Resample):
    """``x + GELU(Norm(Conv3x3(x)))`` on channels-last ``[B, H, W, C]`` features: a dense
    convolution, cheap at full resolution where an MLP block is not (few channels, many pixels)."""

    def __init__(self, dim: int, norm: str = "layer") -> None:
        super().__init__(nn.Conv2d(dim, dim, 3, padding=1), dim, norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class ConvStem(nn.Module):
    """3x3 convolution to ``C0`` channels at full resolution, norm, GELU, then ``units``
    :class:`ConvUnit`: ``[B, in, S, S]`` -> ``[B, S, S, C0]``."""

    def __init__(self, in_chans: int, dim: int, norm: str = "layer", units: int = 0) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 3, padding=1)
        self.norm = make_norm(norm, dim)
        self.units = nn.Sequential(*(ConvUnit(dim, norm) for _ in range(units)))

    def forward(self, x: Tensor) -> Tensor:
        return self.units(F.gelu(self.norm(self.proj(x).permute(0, 2, 3, 1))))


class ConvNeXtUNet(SegmentationModel):
    """M4oE ConvNeXt U-Net over a fixed set of modalities (one expert each) and dataset label sets.

    Uses ``embed_dim`` (width of the full-resolution level), ``depths`` (blocks per level, level 0 at
    full resolution; the decoder has the same depths on all but the bottleneck level),
    ``kernel_size``, ``mlp_ratio``, ``compute_matched``, ``moe_encoder`` / ``moe_decoder``,
    ``routing``, ``gate_modality``, ``closed_experts``, ``drop_path_rate`` and ``deep_supervision``
    of :class:`m4oe.config.ModelConfig`.
    """

    def __init__(self, config: ModelConfig, modalities: list[str], label_sets: dict[str, list[str]]) -> None:
        super().__init__(config, modalities, label_sets)
        cfg, n = config, config.num_stages
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        drop = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(n)]
        make = {moe: self.mlp_factory(moe) for moe in (False, True)}

        def stage(i: int, moe: bool) -> ConvStage:
            return ConvStage(
                dims[i],
                cfg.depths[i],
                cfg.kernel_size,
                make[moe],
                drop[starts[i] : starts[i] + cfg.depths[i]],
                cfg.norm,
                cfg.spatial == "depthwise",
            )

        # names shared with the Swin-UNet (patch_embed, encoder, merges, norm, decoder) so that phase-1
        # loading, mirroring the encoder into the decoder and the expert maps work on both
        self.patch_embed = ConvStem(cfg.in_chans, dims[0], cfg.norm, cfg.full_res_convs)
        self.encoder = nn.ModuleList(stage(i, cfg.moe_encoder) for i in range(n))
        self.merges = nn.ModuleList(
            Resample(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), dims[i + 1], cfg.norm)
            for i in range(n - 1)
        )
        self.norm = make_norm(cfg.norm, dims[-1])
        self.expands = nn.ModuleList(
            Resample(nn.ConvTranspose2d(dims[i + 1], dims[i], 2, stride=2), dims[i], cfg.norm) for i in range(n - 1)
        )
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1))
        self.decoder = nn.ModuleList(stage(i, cfg.moe_decoder) for i in range(n - 1))
        self.refine = nn.Sequential(*(ConvUnit(dims[0], cfg.norm) for _ in range(cfg.full_res_convs)))
        self.norm_up = make_norm(cfg.norm, dims[0])
        self.head = DynamicHead(dims[0], self.label_mask())
        levels = range(1, min(3, n - 1)) if cfg.deep_supervision else range(0)
        self.aux_norms = nn.ModuleList(make_norm(cfg.norm, dims[i]) for i in levels)
        self.aux_heads = nn.ModuleList(DynamicHead(dims[i], self.label_mask()) for i in levels)
        self.apply(partial(init_weights, layers=(nn.Linear, nn.Conv2d, nn.ConvTranspose2d), he=cfg.init == "kaiming"))
        start_from_centre_slice(self.patch_embed.proj, cfg.slice_context)

    @property
    def bottleneck_stride(self) -> int:
        return 2 ** (self.config.num_stages - 1)

    def embed(self, image: Tensor) -> Tensor:
        return self.patch_embed(image)

    def encode_embedded(self, x: Tensor, modality, routing: str | None, gates: list | None = None):
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x, modality, routing, gates)
            if i < len(self.merges):
                skips.append(x)
                x = self.merges[i](x)
        return self.norm(x), skips

    def decode(self, x: Tensor, skips: list[Tensor], modality, routing: str | None, gates: list | None):
        """Returns the full-resolution features ``[B, C0, S, S]`` and the coarser ones per level."""
        levels: list[Tensor] = [x] * len(self.decoder)
        for i in reversed(range(len(self.decoder))):
            x = self.expands[i](x)
            x = self.skip_fuse[i](torch.cat([x, skips[i]], dim=-1))
            x = self.decoder[i](x, modality, routing, gates)
            levels[i] = x
        return self.norm_up(self.refine(x)).permute(0, 3, 1, 2), levels

    def forward(
        self,
        image: Tensor,
        modality: Tensor | int | None = None,
        dataset: Tensor | None = None,
        return_gates: bool = False,
        routing: str | None = None,
        deep_supervision: bool = False,
    ):
        """Segment a batch of slices; arguments and returns as :meth:`M4oEUNet.forward`.

        With ``deep_supervision`` (training) the logits are followed by a list of coarser logits
        (``[B, K, S/2, S/2]``, ``[B, K, S/4, S/4]``): ``(logits, aux)`` or ``(logits, gates, aux)``.
        """
        self._check_input(image, modality, dataset)
        gates: list | None = [] if return_gates else None
        x, skips = self.encode_embedded(self.embed(image), modality, routing, gates)
        features, levels = self.decode(x, skips, modality, routing, gates)
        logits = self.head(features, dataset)
        outputs: tuple = (logits, gates) if return_gates else (logits,)
        if deep_supervision:
            aux = [
                head(norm(levels[i + 1]).permute(0, 3, 1, 2), dataset)
                for i, (norm, head) in enumerate(zip(self.aux_norms, self.aux_heads, strict=True))
            ]
            outputs = (*outputs, aux)
        return outputs if len(outputs) > 1 else logits


# M4oE on a ConvNeXt-block U-Net (full-resolution first level, deep supervision): learns from small data
# and small compute. Experts are compute-matched (hidden 3C/E each).
_SMALL = dict(arch="convnext", img_size=128, embed_dim=16, depths=(0, 1, 2, 2, 2), kernel_size=3, mlp_ratio=3.0,
              drop_path_rate=0.0, deep_supervision=True, init="kaiming")  # fmt: skip
register_preset("m4oe-convnext-s", ModelConfig(**_SMALL, compute_matched=True))
# Its dense twin (plain MLP in every block).
register_preset("convnext-unet-s", ModelConfig(**_SMALL, moe_encoder=False, moe_decoder=False))
