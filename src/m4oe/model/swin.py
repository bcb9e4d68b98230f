"""Swin Transformer building blocks for a 2D Swin-UNet (Liu et al. 2021; Cao et al. 2022).

Tokens are kept as ``[B, H, W, C]`` grids throughout. Window attention runs through
``scaled_dot_product_attention`` with the relative position bias and the shifted-window mask passed
as one additive ``attn_mask``; the shift mask and the bias index are buffers built once per block.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.choices import ATTENTION_KERNELS
from .layers import DropPath


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B, nW, window*window, C]`` (windows in row-major order)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(B, (H // window) * (W // window), window * window, C)


def window_reverse(windows: Tensor, window: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B, nW, window*window, C]`` -> ``[B, H, W, C]``."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // window, W // window, window, window, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(window: int) -> Tensor:
    """``[N, N]`` index into a ``(2w-1)^2`` bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(H: int, W: int, window: int, shift: int) -> Tensor:
    """Additive mask ``[nW, N, N]``: -inf-like between tokens from different regions after the roll."""
    region = torch.zeros(1, H, W, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (hs, ws) in enumerate((h, w) for h in bounds for w in bounds):
        region[:, hs, ws, :] = label
    ids = window_partition(region, window).squeeze(-1).squeeze(0)  # [nW, N]
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


def set_attention_kernel(kernel: str) -> None:
    """``sdpa`` (PyTorch's fused attention, the default) or ``explicit`` (matmul + softmax; a benchmark A/B)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be sdpa or explicit, got {kernel!r}")
    WindowAttention.kernel = kernel


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    kernel: ClassVar[str] = "sdpa"  # "sdpa" or "explicit"; set for every block by set_attention_kernel

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> Tensor:
        N = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)  # [heads, N, N]

    def attention_mask(self, mask: Tensor | None, num_windows: int) -> Tensor:
        """Additive SDPA mask, position bias (+ shift mask): ``[1, nW * heads, N, N]``.

        The same layout for shifted and plain blocks keeps every block on the fused attention
        kernels. In inference (eval mode, no grad, eager) it is cached until the bias table changes.
        """
        cacheable = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = (
                self.relative_position_bias_table._version,
                self.relative_position_bias_table.data_ptr(),
                num_windows,
            )
            if getattr(self, "_mask_key", None) == key:
                return self._mask_cache
        bias = self.position_bias().unsqueeze(0)  # [1, heads, N, N]
        combined = bias + mask.unsqueeze(1) if mask is not None else bias.expand(num_windows, -1, -1, -1)
        combined = combined.reshape(1, -1, *combined.shape[-2:])
        if cacheable:
            self._mask_key, self._mask_cache = key, combined
        return combined

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:
        """``windows``: ``[B, nW, N, C]``; ``mask``: ``[nW, N, N]`` or None."""
        B, nW, N, C = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).view(B, nW, N, 3, h, C // h)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, N, d]
        # 4D for the fused kernels: windows folded into heads, so the mask broadcasts over the batch
        fold = (B, nW * h, N, -1)
        attn_mask = self.attention_mask(mask, nW).to(q.dtype)
        q, k, v = q.reshape(fold), k.reshape(fold), v.reshape(fold)
        if WindowAttention.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:  # written out: lets torch.compile fuse bias + mask + softmax for the small windows
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + attn_mask
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.view(B, nW, h, N, -1).transpose(2, 3).reshape(B, nW, N, C))


class SwinBlock(nn.Module):
    """``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, with MLP either dense or an M4oE layer."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp: nn.Module,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if resolution <= window:  # the window covers the grid: nothing to shift
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor, modality: Tensor | None, routing: str | None):
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x)
        mlp_out, gates = self.mlp(self.norm2(x).view(B, H * W, C), modality, routing)
        return x + self.drop_path(mlp_out.view(B, H, W, C)), gates


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches to tokens: ``[B, in, H, W]`` -> ``[B, H/p, W/p, C]``."""

    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised and projected to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear to ``scale^2 * C_out`` channels, rearranged into a ``scale``-times finer grid."""

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        s = self.scale
        x = self.expand(x).view(B, H, W, s, s, self.out_dim).transpose(2, 3)
        return self.norm(x.reshape(B, H * s, W * s, self.out_dim))


class SwinStage(nn.Module):
    """A run of Swin blocks at one resolution, alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window: int,
        make_mlp,
        drop_path: list[float],
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                resolution,
                num_heads,
                window,
                shift=0 if i % 2 == 0 else window // 2,
                mlp=make_mlp(dim),
                drop_path=drop_path[i],
                qkv_bias=qkv_bias,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, modality: Tensor | None, routing: str | None, gates: list | None):
        for block in self.blocks:
            x, block_gates = block(x, modality, routing)
            if gates is not None and block_gates is not None:
                gates.append(block_gates)
        return x
