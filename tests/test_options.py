"""Options that had no test: instance norm in the ConvNeXt blocks, SGD with the poly schedule, Swin
attention without a qkv bias. Each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m4oe import create_model
from m4oe.config import TrainConfig
from m4oe.model.convnext_unet import InstanceNormLast
from m4oe.train.schedule import build_optimizer, build_scheduler


def test_instance_norm_matches_torchs_on_channels_last_features():
    torch.manual_seed(0)
    norm = InstanceNormLast(5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64) * 4 + 2
    expected = F.instance_norm(x.permute(0, 3, 1, 2), weight=norm.weight.double(), bias=norm.bias.double(), eps=1e-5)
    assert torch.allclose(norm.double()(x), expected.permute(0, 2, 3, 1), atol=1e-10)
    model = create_model("m4oe-convnext-s", modalities=["CT"], label_sets={"a": ["background", "liver"]},
                         img_size=64, norm="instance")  # fmt: skip
    assert any(isinstance(m, InstanceNormLast) for m in model.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.encoder.modules())
    assert model(torch.randn(2, 1, 64, 64), 0).shape == (2, 2, 64, 64)


def test_sgd_with_the_poly_schedule_is_nnunets():
    params = [torch.nn.Parameter(torch.zeros(3))]
    config = TrainConfig(optimizer="sgd", schedule="poly", warmup_epochs=0.0, min_lr=0.0, weight_decay=3e-5)
    optimizer = build_optimizer(params, [], config, 0.01, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 3e-5)
    scheduler = build_scheduler(optimizer, config, 0.01, total_steps=100, steps_per_epoch=10)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (0, 1, 50, 99):  # nnU-Net: lr * (1 - step / steps) ** 0.9
        assert rates[step] == pytest.approx(0.01 * (1 - step / 100) ** 0.9, rel=1e-9)


@pytest.mark.slow
def test_swin_attention_without_qkv_bias_matches_monais():
    swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
    from .test_swin_reference import paired_blocks

    dim, heads, window, shift, resolution = 8, 2, 4, 2, 8
    ours, monai = paired_blocks(dim, heads, window, shift, resolution, qkv_bias=False)
    assert ours.attn.qkv.bias is None and monai.attn.qkv.bias is None
    x = torch.randn(2, resolution, resolution, dim, dtype=torch.float64)
    mask = swin_unetr.compute_mask([resolution, resolution], (window, window), (shift, shift), x.device)
    assert torch.allclose(ours(x, None, None)[0], monai(x, mask.double()), atol=1e-10)
    model = create_model("tiny", modalities=["CT"], label_sets={"a": ["background", "liver"]}, qkv_bias=False)
    assert all(m.qkv.bias is None for m in model.modules() if hasattr(m, "qkv"))
    with torch.no_grad():
        assert not math.isnan(float(model(torch.randn(1, 1, 128, 128), 0).sum()))
