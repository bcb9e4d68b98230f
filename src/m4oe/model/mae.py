"""Phase 1: masked-autoencoder pre-training of the encoder and its modality experts (Swin-MAE style).

A Swin or convolutional encoder needs the full grid, so masked patches are not dropped as in
ViT-MAE: their features are replaced by a learned mask token after the first layer (the Swin patch
embedding, or the ConvNeXt U-Net's full-resolution stem). Masking works on units of one bottleneck
cell (``patch_size * 2**(stages-1)`` pixels for the Swin-UNet: a whole number of attention windows
of the first stage at the default sizes), so the encoder cannot fill masked regions in from
neighbouring tokens of the same window. The decoder is light: one linear
layer from each bottleneck token to the pixels of its unit. The loss is the MSE on masked units only,
against per-unit normalised pixels (``norm_pix_loss``) as in MAE.

Each sample goes through its own modality's expert (``hard`` routing), so experts specialise while
attention, norms and merging layers learn from every modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SegmentationModel


class MAEPretrainer(nn.Module):
    """Wraps the encoder of a model (sharing its modules) for masked image modelling."""

    def __init__(self, model: SegmentationModel, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        cfg = model.config
        self.unit = model.bottleneck_stride
        self.grid = cfg.img_size // self.unit
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_embed, self.encoder, self.merges, self.norm = (
            model.patch_embed,
            model.encoder,
            model.merges,
            model.norm,
        )
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(cfg.embed_dim * 2 ** (cfg.num_stages - 1), self.unit**2 * cfg.in_chans)
        self.in_chans = cfg.in_chans
        self._encode = model.encode_embedded  # runs the modules registered above

    def random_mask(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``[B, g, g]`` bool, true where a unit is masked; exactly ``round(ratio * g^2)`` per sample."""
        units = self.grid * self.grid
        masked = int(round(self.mask_ratio * units))
        noise = torch.rand(batch, units, generator=generator, device=device)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return (ranks < masked).view(batch, self.grid, self.grid)

    def forward(self, image: Tensor, modality: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(loss, reconstruction [B, C, S, S])`` for images with ``mask`` units hidden."""
        tokens = self.patch_embed(image)  # [B, G, G, C]
        per_unit = tokens.shape[1] // self.grid
        token_mask = mask.repeat_interleave(per_unit, 1).repeat_interleave(per_unit, 2).unsqueeze(-1)
        x = torch.where(token_mask, self.mask_token.to(tokens.dtype), tokens)
        pred = self.decoder(self._encode(x, modality, "hard")[0])  # [B, g, g, unit*unit*C]
        target = _to_units(image, self.unit)  # [B, g, g, unit*unit*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_unit_loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)
        loss = (per_unit_loss * mask).sum() / mask.sum().clamp_min(1)
        return loss, _from_units(pred.detach(), self.unit, self.in_chans)


def _to_units(image: Tensor, unit: int) -> Tensor:
    B, C, H, W = image.shape
    x = image.view(B, C, H // unit, unit, W // unit, unit).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, H // unit, W // unit, unit * unit * C)


def _from_units(units: Tensor, unit: int, channels: int) -> Tensor:
    B, gh, gw, _ = units.shape
    x = units.view(B, gh, gw, unit, unit, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, gh * unit, gw * unit)


@torch.no_grad()
def load_pretrained(model: SegmentationModel, pretrained: SegmentationModel) -> dict[str, list[str]]:
    """Phase 2 initialisation: encoder and experts from a pre-trained model, decoder mirrored.

    Encoder parameters are copied by name; experts are matched by modality name (a modality the
    pre-trained model did not have keeps its fresh expert). Each decoder level's Swin blocks are then
    initialised from the encoder stage of the same width, as Swin-Unet does. Gates and the head keep
    their fresh initialisation. Returns a report of what was copied.
    """
    if pretrained.config.slice_context != model.config.slice_context:
        raise ValueError(
            f"the pre-trained model saw slices with {pretrained.config.slice_context} neighbours on each side and "
            f"this one takes {model.config.slice_context}: pre-train again with the same model.slice_context"
        )
    report: dict[str, list[str]] = {"encoder": [], "mirrored": [], "new_experts": []}
    source = dict(pretrained.named_parameters())
    expert_map = [pretrained.modalities.index(m) if m in pretrained.modalities else -1 for m in model.modalities]
    report["new_experts"] = [m for m, j in zip(model.modalities, expert_map, strict=True) if j < 0]
    prefixes = model.encoder_prefixes
    experts, gates = model.expert_parameter_names(), model.gate_parameter_names()
    for name, param in model.named_parameters():
        if not name.startswith(prefixes) or name not in source:
            continue
        if name in experts and param.shape[0] == len(expert_map):
            for e, j in enumerate(expert_map):
                if j >= 0 and param[e].shape == source[name][j].shape:
                    param[e].copy_(source[name][j])
            report["encoder"].append(name)
        elif name in gates:
            continue
        elif param.shape == source[name].shape:
            param.copy_(source[name])
            report["encoder"].append(name)
    report["mirrored"] = mirror_encoder_to_decoder(model)
    return report


@torch.no_grad()
def mirror_encoder_to_decoder(model: SegmentationModel) -> list[str]:
    """Copy each encoder stage's blocks into the decoder level of the same width, where shapes match."""
    copied = []
    gates = model.gate_parameter_names()
    for level, stage in enumerate(model.decoder):
        encoder_params = dict(model.encoder[level].named_parameters())
        for name, param in stage.named_parameters():
            if f"decoder.{level}.{name}" in gates:
                continue
            twin = encoder_params.get(name)
            if twin is not None and twin.shape == param.shape:
                param.copy_(twin)
                copied.append(f"decoder.{level}.{name}")
    return copied
