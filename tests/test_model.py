"""The M4oE Swin-UNet: shapes, sizes, routing, head masking, gradients, dense initialisation."""

from __future__ import annotations

import pytest
import torch

from m4oe import create_model
from m4oe.config import ConfigError
from m4oe.model import init_from_dense, parameter_counts
from m4oe.model.head import class_argmax
from m4oe.model.moe import MoEMLP
from m4oe.model.swin import shifted_window_mask, window_partition, window_reverse

from .conftest import LABEL_SETS, MICRO, MODALITIES, batch


def test_window_partition_round_trip_and_layout():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).view(2, 8, 8, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 4, 16, 3)
    assert torch.equal(windows[1, 1, 0], x[1, 0, 4])  # second window starts at column 4
    assert torch.equal(window_reverse(windows, 4, 8, 8), x)


def test_shift_mask_separates_rolled_regions():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert (mask[3] < 0).any() and torch.all(mask[3].diagonal() == 0)


def test_output_shape_and_class_names(micro_model):
    image, modality, dataset = batch(3)
    logits = micro_model(image, modality, dataset)
    assert logits.shape == (3, len(micro_model.class_names), 64, 64)
    assert micro_model.class_names[:5] == ["background", "spleen", "right_kidney", "left_kidney", "liver"]
    # liver etc. are shared between the CT and MRI label sets: one class each
    assert len(micro_model.class_names) == 1 + 4 + 3


@pytest.mark.slow
def test_full_size_m4oe_t_at_224():
    model = create_model("m4oe-t", modalities=["CT", "MRI"], label_sets={"a": LABEL_SETS["ct"]}).eval()
    with torch.no_grad():
        logits, gates = model(torch.randn(1, 1, 224, 224), torch.tensor([1]), return_gates=True)
    assert logits.shape == (1, 5, 224, 224)
    assert len(gates) == 8 + 6  # every encoder block and every decoder block
    assert gates[0].shape == (1, 56 * 56, 2) and gates[7].shape == (1, 7 * 7, 2)


@pytest.mark.slow
def test_other_valid_size_256_window_8():
    model = create_model("tiny", modalities=["CT"], label_sets={"a": ["background", "x"]}, img_size=256, window_size=8)
    assert model(torch.randn(1, 1, 256, 256)).shape == (1, 2, 256, 256)


def test_invalid_size_names_valid_sizes():
    with pytest.raises(ConfigError, match=r"multiple of 224 \(valid sizes: 224, 448, 672"):
        create_model("m4oe-t", modalities=["CT"], label_sets={"a": ["background", "x"]}, img_size=256)


def test_wrong_input_shape_or_ids_are_rejected(micro_model):
    with pytest.raises(ValueError, match=r"\[B, 1, 64, 64\]"):
        micro_model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="dataset index out of range"):
        micro_model(torch.randn(1, 1, 64, 64), torch.tensor([0]), torch.tensor([5]))


def test_gates_returned_for_every_block_and_sum_to_one(micro_model):
    image, modality, dataset = batch(2)
    _, gates = micro_model(image, modality, dataset, return_gates=True)
    assert len(gates) == sum(micro_model.config.depths) + sum(micro_model.config.depths[:-1])
    for g in gates:
        assert g.shape[0] == 2 and g.shape[2] == len(MODALITIES)
        assert torch.allclose(g.sum(-1), torch.ones(g.shape[:2]), atol=1e-6)


def test_moe_placement_switches():
    enc_only = create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, moe_decoder=False, **MICRO)
    dec_only = create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, moe_encoder=False, **MICRO)
    assert all(isinstance(b.mlp, MoEMLP) for s in enc_only.encoder for b in s.blocks)
    assert not any(isinstance(b.mlp, MoEMLP) for s in enc_only.decoder for b in s.blocks)
    assert all(isinstance(b.mlp, MoEMLP) for s in dec_only.decoder for b in s.blocks)
    assert not any(isinstance(b.mlp, MoEMLP) for s in dec_only.encoder for b in s.blocks)


def test_head_masks_classes_outside_each_dataset(micro_model):
    image, modality, dataset = batch(3)
    micro_model.eval()
    with torch.no_grad():
        probs = micro_model(image, modality, dataset).softmax(1)
    names = micro_model.class_names
    for b, labels in enumerate(LABEL_SETS.values()):
        outside = [k for k, name in enumerate(names) if name not in labels]
        inside = [k for k, name in enumerate(names) if name in labels]
        assert torch.all(probs[b, outside] == 0)
        assert torch.allclose(probs[b, inside].sum(0), torch.ones(64, 64), atol=1e-5)
        assert set(probs[b].argmax(0).unique().tolist()) <= set(inside)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_argmax_matches_torch_argmax_including_ties(dtype):
    torch.manual_seed(0)
    scores = torch.randint(-3, 4, (2, 14, 9, 7)).to(dtype)  # few values: many ties
    scores[0, :, 0, 0] = torch.finfo(dtype).min  # a masked-out pixel: every class at the lowest logit
    assert torch.equal(class_argmax(scores), scores.argmax(1))
    assert torch.equal(class_argmax(scores[:, :1]), torch.zeros(2, 9, 7, dtype=torch.long))
    wide = torch.randn(1, 300, 4, 5)  # more classes than uint8 holds
    assert torch.equal(class_argmax(wide), wide.argmax(1))


def test_mixed_batches_are_shuffle_invariant(micro_model):
    micro_model.eval()
    image, modality, dataset = batch(6)
    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    with torch.no_grad():
        together = micro_model(image, modality, dataset)
        shuffled = micro_model(image[perm], modality[perm], dataset[perm])
        alone = torch.cat([micro_model(image[i : i + 1], modality[i : i + 1], dataset[i : i + 1]) for i in range(6)])
    assert torch.allclose(shuffled, together[perm], atol=1e-5)
    finite = together > -1e30
    assert torch.equal(finite, alone > -1e30)
    assert torch.allclose(together[finite], alone[finite], atol=1e-5)


@pytest.mark.parametrize("routing", ["soft", "hard", "uniform"])
def test_every_parameter_receives_a_gradient(routing):
    model = create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, drop_path_rate=0.1, **MICRO)
    image, modality, dataset = batch(6)
    logits = model(image, modality, dataset, routing=routing)
    target = torch.randint(0, 4, (6, 64, 64))
    keep = model.head.label_mask[dataset]
    loss = torch.nn.functional.cross_entropy(logits.masked_fill(~keep[:, :, None, None], -1e4), target)
    loss.backward()
    for name, p in model.named_parameters():
        if routing != "soft" and ".gate." in name:
            assert p.grad is None, name  # the gate is not used without soft routing
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_routing_override_changes_output(micro_model):
    image, modality, dataset = batch(3)
    micro_model.eval()
    with torch.no_grad():
        soft = micro_model(image, modality, dataset)
        micro_model.set_routing("hard")
        hard = micro_model(image, modality, dataset)
    assert micro_model.config.routing == "hard"
    assert not torch.allclose(soft, hard)


@pytest.mark.slow
def test_compute_matched_preset_is_close_to_dense_size():
    kw = dict(modalities=MODALITIES, label_sets=LABEL_SETS)
    dense = parameter_counts(create_model("swin-unet", **kw))["total"]
    lite = parameter_counts(create_model("m4oe-t-lite", **kw))["total"]
    full = parameter_counts(create_model("m4oe-t", **kw))
    assert abs(lite - dense) / dense < 0.01
    assert full["total"] > 2 * dense
    dense_mlp = dense - (full["total"] - full["experts"] - full["gates"])  # every non-MLP part is shared
    assert full["experts"] == 3 * dense_mlp  # three experts, each as wide as the dense MLP


def test_init_from_dense_reproduces_dense_model():
    dense = create_model("swin-unet", modalities=MODALITIES, label_sets=LABEL_SETS, **MICRO).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moe = create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, **MICRO).eval()
    report = init_from_dense(moe, dense.state_dict(), class_names=dense.class_names)
    assert len(report["experts"]) == sum(moe.config.depths) * 2 - moe.config.depths[-1]
    assert "head.proj.weight" in report["copied"]
    image, modality, dataset = batch(3)
    with torch.no_grad():
        expected = dense(image, modality, dataset)
        out = moe(image, modality, dataset)  # any gate mix of identical experts is the dense MLP
    assert torch.allclose(out, expected, atol=1e-4)


def test_flop_count_difference_between_soft_and_hard_routing(micro_model):
    """Soft routing runs E experts and the gate, hard routing one expert: check the counter by hand."""
    from m4oe.model import forward_flops

    E = micro_model.num_experts
    expected = 0
    grid = micro_model.config.img_size // micro_model.config.patch_size
    stages = [(s, grid // 2**i) for i, s in enumerate(micro_model.encoder)]
    stages += [(s, grid // 2**i) for i, s in enumerate(micro_model.decoder)]
    for stage, res in stages:
        for block in stage.blocks:
            L, C, H = res * res, block.mlp.dim, block.mlp.hidden
            expected += 4 * L * C * H * (E - 1) + 4 * L * C * E
    assert forward_flops(micro_model) - forward_flops(micro_model, routing="hard") == expected


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
@pytest.mark.parametrize("shift", [0, 1])
def test_window_attention_matches_plain_softmax_attention(shift, kernel, monkeypatch):
    from m4oe.model.swin import WindowAttention, set_attention_kernel

    monkeypatch.setattr(WindowAttention, "kernel", WindowAttention.kernel)  # global: restored after the test
    set_attention_kernel(kernel)
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, num_heads=2, window=2).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(3, 16, 4, 8, dtype=torch.float64)  # 3 images of 8x8 tokens in 16 windows of 2x2
    mask = shifted_window_mask(8, 8, 2, shift).double() if shift else None
    out = attn(x, mask)
    q, k, v = attn.qkv(x).view(3, 16, 4, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)
    scores = q @ k.transpose(-1, -2) / 2.0 + attn.position_bias()
    if mask is not None:
        scores = scores + mask[:, None]
    expected = attn.proj((scores.softmax(-1) @ v).transpose(2, 3).reshape(3, 16, 4, 8))
    assert torch.allclose(out, expected, atol=1e-10)
    attn.eval()
    with torch.no_grad():
        first = attn(x, mask)
        attn.relative_position_bias_table.add_(torch.randn_like(attn.relative_position_bias_table))  # cache follows
        assert not torch.allclose(attn(x, mask), first)


def test_unknown_attention_kernel_is_rejected():
    from m4oe.model.swin import set_attention_kernel

    with pytest.raises(ValueError, match="sdpa or explicit"):
        set_attention_kernel("flash3")


def test_m4oe_layers_declare_their_expert_and_gate_parameters():
    """The roles the M4oE layer declares, against the names they used to be found by."""
    from m4oe import create_model

    for preset in ("tiny", "m4oe-convnext-s"):
        model = create_model(preset, modalities=["CT", "MRI"], label_sets={"a": ["background", "liver"]},
                             gate_modality=True, img_size=64 if preset != "tiny" else 128)  # fmt: skip
        names = [name for name, _ in model.named_parameters()]
        experts = {n for n in names if n.endswith((".mlp.w1", ".mlp.b1", ".mlp.w2", ".mlp.b2"))}
        gates = {n for n in names if ".gate." in n or "modality_embed" in n}
        assert experts and gates
        assert model.expert_parameter_names() == experts
        assert model.gate_parameter_names() == gates
        roles = model.moe_parameter_roles()
        assert {roles[n] for n in gates} == {"gate_weight", "gate_bias", "modality_embedding"}
