"""The Swin block (window attention, shift, shift mask, relative position bias, MLP) against MONAI's
independent SwinTransformerBlock with the same weights copied in."""

from __future__ import annotations

import pytest
import torch

from m4oe.model.moe import DenseMLP, MoEMLP
from m4oe.model.swin import SwinBlock

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def paired_blocks(dim: int, heads: int, window: int, shift: int, resolution: int, qkv_bias: bool = True):
    torch.manual_seed(0)
    ours = SwinBlock(dim, resolution, heads, window, shift, DenseMLP(dim, 4 * dim), qkv_bias=qkv_bias).double()
    monai = swin_unetr.SwinTransformerBlock(dim, heads, (window, window), (shift, shift), mlp_ratio=4.0,
                                            qkv_bias=qkv_bias).double()  # fmt: skip
    with torch.no_grad():
        for p in monai.parameters():
            p.normal_(0, 0.5)  # a random, asymmetric bias table: a transposed index would show
        ours.norm1.load_state_dict(monai.norm1.state_dict())
        ours.norm2.load_state_dict(monai.norm2.state_dict())
        ours.attn.qkv.load_state_dict(monai.attn.qkv.state_dict())
        ours.attn.proj.load_state_dict(monai.attn.proj.state_dict())
        ours.attn.relative_position_bias_table.copy_(monai.attn.relative_position_bias_table)
        ours.mlp.fc1.load_state_dict(monai.mlp.linear1.state_dict())
        ours.mlp.fc2.load_state_dict(monai.mlp.linear2.state_dict())
    return ours, monai


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_swin_block_matches_monai(shift, kernel, monkeypatch):
    from m4oe.model.swin import WindowAttention

    monkeypatch.setattr(WindowAttention, "kernel", kernel)
    dim, heads, window, resolution = 8, 2, 4, 8
    ours, monai = paired_blocks(dim, heads, window, shift, resolution)
    x = torch.randn(2, resolution, resolution, dim, dtype=torch.float64)
    mask = swin_unetr.compute_mask([resolution, resolution], (window, window), (shift, shift), x.device)
    expected = monai(x, mask.double() if shift else None)
    got, gates = ours(x, None, None)
    assert gates is None
    assert torch.allclose(got, expected, atol=1e-10)


def test_m4oe_block_with_identical_experts_matches_monai():
    """Experts that are all copies of MONAI's MLP give MONAI's block whatever the gate says."""
    dim, heads, window, shift, resolution = 8, 2, 4, 2, 8
    dense, monai = paired_blocks(dim, heads, window, shift, resolution)
    moe = SwinBlock(dim, resolution, heads, window, shift, MoEMLP(dim, 4 * dim, 3)).double()
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith("mlp.")}
    moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        moe.mlp.gate.weight.normal_()
        moe.mlp.load_dense(dense.mlp.fc1.weight, dense.mlp.fc1.bias, dense.mlp.fc2.weight, dense.mlp.fc2.bias)
    x = torch.randn(3, resolution, resolution, dim, dtype=torch.float64)
    mask = swin_unetr.compute_mask([resolution, resolution], (window, window), (shift, shift), x.device)
    got, gates = moe(x, torch.tensor([0, 1, 2]), "soft")
    assert torch.allclose(got, monai(x, mask.double()), atol=1e-10)
    assert gates.shape == (3, resolution * resolution, 3)
