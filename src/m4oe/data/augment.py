"""Batched data augmentation in torch (runs on CPU or GPU, one call per batch, no per-sample loop).

Spatial: random rotation, isotropic scaling, optional flips and optional elastic deformation, all
composed into one sampling grid (images bilinear, labels nearest). Intensity: multiplicative
brightness, additive shift, gamma (on each slice's own range) and Gaussian noise. Robustness, off by
default (``robust_prob``): a coarser in-plane resolution (down- and up-sampled, as from a scanner's
thicker slices or coarser pixels) and a random monotonic remapping of intensities (an MR sequence's
other contrast), each drawn for a slice with that probability.

Flips are off by default: mirroring left-right swaps the meaning of lateral labels (left / right
kidney, adrenal glands) on abdominal data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    spatial_prob: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    flip_x_prob: float = 0.0
    flip_y_prob: float = 0.0
    elastic_prob: float = 0.0
    elastic_alpha: float = 0.03  # displacement, as a fraction of the image side
    elastic_grid: int = 8  # control points per side of the smooth displacement field
    brightness: tuple[float, float] = (0.9, 1.1)
    shift_std: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    noise_std: float = 0.05
    noise_prob: float = 0.15
    robust_prob: float = 0.0  # each of the robustness transforms, per slice (0: none drawn at all)
    lowres: tuple[float, float] = (0.4, 1.0)  # the side of the coarser grid, as a fraction of the slice's
    remap_knots: int = 4  # interior knots of the monotonic intensity curve


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chance(n: int, p: float, generator: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def augment_batch(
    image: Tensor, label: Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Augment ``image [B, 1, S, S]`` float and ``label [B, S, S]`` long together.

    ``generator`` must live on the batch's device; the same generator state gives the same result.
    """
    B, device = image.shape[0], image.device
    spatial = _chance(B, config.spatial_prob, generator, device)
    angle = _uniform(B, -1, 1, generator, device) * math.radians(config.rotate_deg) * spatial
    scale = torch.where(spatial, _uniform(B, *config.scale, generator, device), torch.ones(B, device=device))
    flip_x = torch.where(_chance(B, config.flip_x_prob, generator, device), -1.0, 1.0).to(device)
    flip_y = torch.where(_chance(B, config.flip_y_prob, generator, device), -1.0, 1.0).to(device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_y, torch.zeros_like(cos)], dim=-1),
            torch.stack([sin * flip_x, cos * flip_y, torch.zeros_like(cos)], dim=-1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    if config.elastic_prob > 0:
        elastic = _chance(B, config.elastic_prob, generator, device).float()[:, None, None, None]
        coarse = torch.randn(B, 2, config.elastic_grid, config.elastic_grid, generator=generator, device=device)
        field = F.interpolate(coarse, size=image.shape[-2:], mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1) * (2 * config.elastic_alpha) * elastic
    # Decided from the config, not from the drawn values: reading those back would stall a GPU.
    warps = config.spatial_prob > 0 or config.flip_x_prob > 0 or config.flip_y_prob > 0 or config.elastic_prob > 0
    if warps:
        identity = ~spatial & (flip_x > 0) & (flip_y > 0)
        if config.elastic_prob > 0:
            identity &= elastic.view(-1) == 0
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        warped_label = F.grid_sample(label[:, None].float(), grid, mode="nearest", align_corners=False)
        keep = identity[:, None, None, None]
        image = torch.where(keep, image, warped)
        label = torch.where(keep[:, 0], label, warped_label[:, 0].long())
    if config.robust_prob > 0:
        image = _robust(image, config, generator)
    return _intensity(image, config, generator), label


def _robust(image: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Coarser resolution and a monotonic intensity remapping, each on a ``robust_prob`` share of slices."""
    B, S, device = image.shape[0], image.shape[-1], image.device
    coarse = _chance(B, config.robust_prob, generator, device)
    sides = (_uniform(B, *config.lowres, generator, device) * S).round().clamp(4, S).long().tolist()
    slices = []
    for b, side in enumerate(sides):  # one grid size per slice: a loop over the batch's few coarse ones
        one = image[b : b + 1]
        if coarse[b] and side < S:
            small = F.interpolate(one, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            one = F.interpolate(small, size=(S, S), mode="bilinear", align_corners=False)
        slices.append(one)
    image = torch.cat(slices)
    return remap_monotonic(image, _chance(B, config.robust_prob, generator, device), config.remap_knots, generator)


def remap_monotonic(image: Tensor, chosen: Tensor, knots: int, generator: torch.Generator) -> Tensor:
    """Each chosen slice's intensities through a random increasing piecewise-linear curve on its own
    range (its lowest and highest values stay put); the other slices unchanged."""
    B, device = image.shape[0], image.device
    steps = -torch.log(torch.rand(B, knots + 1, generator=generator, device=device).clamp_min(1e-6))  # Dirichlet(1)
    ys = torch.cat([torch.zeros(B, 1, device=device), steps.cumsum(1) / steps.sum(1, keepdim=True)], dim=1)
    lo = image.amin(dim=(1, 2, 3), keepdim=True)
    span = (image.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    x = ((image - lo) / span).clamp(0, 1) * (knots + 1)  # position along the knots' evenly spaced xs
    k = x.floor().clamp(max=knots).long()
    frac = x - k
    flat = ys.view(B, 1, 1, 1, knots + 2).expand(*image.shape, knots + 2)
    y0 = flat.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    y1 = flat.gather(-1, (k + 1).clamp(max=knots + 1).unsqueeze(-1)).squeeze(-1)
    remapped = (y0 + (y1 - y0) * frac) * span + lo
    return torch.where(chosen.view(B, 1, 1, 1), remapped, image)


def _intensity(image: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    B, device = image.shape[0], image.device
    view = (B, 1, 1, 1)
    image = image * _uniform(B, *config.brightness, generator, device).view(view)
    image = image + torch.randn(B, generator=generator, device=device).view(view) * config.shift_std
    use_gamma = _chance(B, config.gamma_prob, generator, device).view(view)
    gamma = _uniform(B, *config.gamma, generator, device).view(view)
    lo = image.amin(dim=(1, 2, 3), keepdim=True)
    span = (image.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    image = torch.where(use_gamma, ((image - lo) / span).pow(gamma) * span + lo, image)
    noisy = _chance(B, config.noise_prob, generator, device).float().view(view)
    noise = torch.randn(image.shape, generator=generator, device=device, dtype=image.dtype)
    return image + noise * config.noise_std * noisy
