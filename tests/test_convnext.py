"""The M4oE ConvNeXt U-Net: blocks against a plain reference, masked head, deep supervision,
phase 1, bundles of the new presets, and the batch Dice against hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m4oe import load_bundle, save_bundle
from m4oe.config import PRESETS, ConfigError, ModelConfig, preset_config
from m4oe.model import create_model, parameter_counts
from m4oe.model.convnext_unet import ConvNeXtBlock, ConvNeXtUNet, ConvUnit
from m4oe.model.mae import MAEPretrainer, load_pretrained
from m4oe.model.moe import MoEMLP
from m4oe.train.losses import deep_supervision_loss, segmentation_loss, soft_dice_batch

LABELS = {"ct": ["background", "liver", "spleen"], "mr": ["background", "liver", "kidney"]}
MICRO = {"img_size": 32, "embed_dim": 8, "depths": (1, 1, 1), "kernel_size": 3}


def micro(preset: str = "m4oe-convnext-s", **overrides) -> ConvNeXtUNet:
    torch.manual_seed(0)
    return create_model(preset, modalities=["CT", "MRI"], label_sets=LABELS, **{**MICRO, **overrides})


def block_reference(block: ConvNeXtBlock, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """One pixel, one sample and one expert at a time, channels-first, LayerNorm written out."""
    mlp = block.mlp
    B, H, W, C = x.shape
    conv = F.conv2d(x.permute(0, 3, 1, 2), block.dwconv.weight, block.dwconv.bias, padding=block.dwconv.padding,
                    groups=C)  # fmt: skip
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                v = conv[b, :, i, j]
                v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + block.norm.eps)
                v = v * block.norm.weight + block.norm.bias
                gates = torch.softmax(mlp.gate.weight @ v + mlp.gate.bias, dim=0)
                mixed = 0
                for e in range(mlp.num_experts):
                    hidden = F.gelu(mlp.w1[e] @ v + mlp.b1[e])
                    mixed = mixed + gates[e] * (mlp.w2[e] @ hidden + mlp.b2[e])
                out[b, i, j] = x[b, i, j] + mixed
    return out


def assert_same_gradients(fast: torch.Tensor, ref: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Backpropagate one random upstream gradient through both outputs; compare every input's gradient."""
    grad = torch.randn_like(fast)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, params, grad),
                             torch.autograd.grad(ref, params, grad), strict=True):  # fmt: skip
        assert torch.allclose(g_fast, g_ref, atol=1e-9)


def test_block_matches_pixel_loop_reference_forward_and_gradients():
    torch.manual_seed(1)
    mlp = MoEMLP(6, 5, 3)
    block = ConvNeXtBlock(6, 3, mlp).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.4)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    modality = torch.tensor([1, 0])
    fast, gates = block(x, modality, "soft")
    ref = block_reference(block, x, modality)
    assert torch.allclose(fast, ref, atol=1e-10)
    assert gates.shape == (2, 20, 3) and torch.allclose(gates.sum(-1), torch.ones(2, 20, dtype=torch.float64))
    assert_same_gradients(fast, ref, [x, *block.parameters()])


def test_full_resolution_conv_unit_matches_a_shift_and_sum_reference():
    torch.manual_seed(2)
    unit = ConvUnit(4).double()
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    # the 3x3 convolution as a sum over the 9 shifted copies of the zero-padded input, channels-last
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    conv = unit.conv.bias.expand(2, 5, 6, 4)
    for di in range(3):
        for dj in range(3):
            conv = conv + padded[:, di : di + 5, dj : dj + 6] @ unit.conv.weight[:, :, di, dj].T
    mean = conv.mean(-1, keepdim=True)
    var = ((conv - mean) ** 2).mean(-1, keepdim=True)
    normed = (conv - mean) / torch.sqrt(var + unit.norm.eps) * unit.norm.weight + unit.norm.bias
    ref = x + 0.5 * normed * (1 + torch.erf(normed / 2**0.5))
    fast = unit(x)
    assert torch.allclose(fast, ref, atol=1e-10)
    assert_same_gradients(fast, ref, [x, *unit.parameters()])


@pytest.mark.slow
def test_full_res_convs_sit_after_the_stem_and_before_the_head():
    plain, model = micro(), micro(full_res_convs=2)
    assert len(model.patch_embed.units) == 2 and len(model.refine) == 2
    assert len(plain.patch_embed.units) == 0 and len(plain.refine) == 0
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 4 * (8 * 8 * 9 + 8 + 2 * 8)  # four units of conv (C*C*9 + C) and norm (2C) at C0 = 8
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        base = model(image, torch.tensor([0, 1]), torch.tensor([0, 1]))
        model.refine[1].conv.weight.add_(1.0)  # the units before the head change the output ...
        assert not torch.allclose(model(image, torch.tensor([0, 1]), torch.tensor([0, 1])), base)
    # ... and phase 1 trains the stem's units (part of the encoder) but not the head's
    mae = MAEPretrainer(model, mask_ratio=0.5)
    loss, _ = mae(image, torch.tensor([0, 1]), mae.random_mask(2))
    loss.backward()
    assert model.patch_embed.units[1].conv.weight.grad.abs().max() > 0
    assert model.refine[0].conv.weight.grad is None
    fresh = micro(full_res_convs=2)
    load_pretrained(fresh, model)
    assert torch.equal(fresh.patch_embed.units[0].conv.weight, model.patch_embed.units[0].conv.weight)
    assert not torch.equal(fresh.refine[1].conv.weight, model.refine[1].conv.weight)


@pytest.mark.slow
def test_shapes_gates_and_deep_supervision():
    model = micro()
    image = torch.randn(3, 1, 32, 32)
    logits, gates, aux = model(image, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), return_gates=True,
                               deep_supervision=True)  # fmt: skip
    assert logits.shape == (3, 4, 32, 32)
    assert [a.shape[-1] for a in aux] == [16]  # 3 levels: one auxiliary head, at 1/2
    # one gate per block: 3 encoder levels + 2 decoder levels of depth 1
    assert len(gates) == 5 and all(torch.allclose(g.sum(-1), torch.ones(())) for g in gates)
    assert model(image, torch.tensor([0, 1, 1])).shape == (3, 4, 32, 32)


@pytest.mark.slow
def test_head_masks_each_datasets_classes_and_batches_are_order_free():
    model = micro().eval()
    image = torch.randn(4, 1, 32, 32)
    modality, dataset = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        logits, aux = model(image, modality, dataset, deep_supervision=True)
        alone = torch.cat([model(image[i : i + 1], modality[i : i + 1], dataset[i : i + 1]) for i in range(4)])
    lowest = torch.finfo(logits.dtype).min
    kidney, spleen = model.class_names.index("kidney"), model.class_names.index("spleen")
    for out in (logits, *aux):
        assert (out[dataset == 0, kidney] == lowest).all() and (out[dataset == 1, spleen] == lowest).all()
        assert (out[dataset == 0, spleen] > lowest).all()
    assert torch.allclose(logits, alone, atol=1e-5)


@pytest.mark.slow
def test_every_parameter_learns_and_phase1_trains_the_encoder():
    model = micro()
    image = torch.randn(4, 1, 32, 32)
    logits, aux = model(image, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), deep_supervision=True)
    (logits.logsumexp(1).mean() + sum(a.logsumexp(1).mean() for a in aux)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []
    mae = MAEPretrainer(model, mask_ratio=0.5)
    assert mae.unit == 4 and mae.grid == 8  # 3 levels: bottleneck cell of 4 px
    mask = mae.random_mask(4)
    loss, recon = mae(image, torch.tensor([0, 0, 0, 0]), mask)
    assert recon.shape == image.shape
    model.zero_grad()
    loss.backward()
    w1 = model.encoder[0].blocks[0].mlp.w1.grad
    assert w1[0].abs().max() > 0 and w1[1].abs().max() == 0  # hard routing: only the CT expert learns
    assert model.head.proj.weight.grad is None  # the decoder and head are not part of phase 1


def test_phase1_weights_load_into_phase2_and_mirror_the_decoder():
    pretrained, fresh = micro(), micro()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.normal_()
    report = load_pretrained(fresh, pretrained)
    assert torch.equal(fresh.encoder[1].blocks[0].dwconv.weight, pretrained.encoder[1].blocks[0].dwconv.weight)
    assert torch.equal(fresh.decoder[1].blocks[0].mlp.w1, pretrained.encoder[1].blocks[0].mlp.w1)
    assert report["mirrored"] and not torch.equal(fresh.head.proj.weight, pretrained.head.proj.weight)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["m4oe-convnext-s", "convnext-unet-s"])
def test_bundle_round_trip_of_each_new_preset(preset, tmp_path):
    model = create_model(preset, modalities=["CT", "MRI"], label_sets=LABELS).eval()
    image = torch.randn(2, 1, model.config.img_size, model.config.img_size)
    modality, dataset = torch.tensor([0, 1]), torch.tensor([1, 0])
    loaded = load_bundle(save_bundle(model, tmp_path / preset)).eval()
    assert isinstance(loaded, ConvNeXtUNet) and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(image, modality, dataset), model(image, modality, dataset))


def test_dense_twin_has_no_experts_and_matches_the_m4oe_size():
    m4oe = create_model("m4oe-convnext-s", modalities=["CT", "MRI", "cine"], label_sets=LABELS)
    dense = create_model("convnext-unet-s", modalities=["CT", "MRI", "cine"], label_sets=LABELS)
    counts, dense_counts = parameter_counts(m4oe), parameter_counts(dense)
    assert dense_counts["experts"] == 0 and counts["experts"] > 0
    # compute-matched experts: the M4oE model is the dense one plus gates (within 1%)
    assert abs(counts["total"] - dense_counts["total"]) / dense_counts["total"] < 0.01


def test_m4oe_t_is_unchanged():
    model = create_model("m4oe-t", modalities=["CT", "MRI", "cine"], label_sets={"d": [f"c{k}" if k else
                         "background" for k in range(17)]})  # fmt: skip
    assert parameter_counts(model) == {"total": 58_482_222, "experts": 46_954_368, "gates": 12_714, "head": 1_632}
    assert PRESETS["m4oe-t"] == ModelConfig()


def test_convnext_config_checks():
    with pytest.raises(ConfigError, match="multiple of 16"):
        preset_config("m4oe-convnext-s", img_size=120)
    with pytest.raises(ConfigError, match="odd"):
        preset_config("m4oe-convnext-s", kernel_size=4)
    with pytest.raises(ConfigError, match="convnext only"):
        preset_config("tiny", deep_supervision=True)
    with pytest.raises(ConfigError, match="full_res_convs is available with arch: convnext only"):
        preset_config("tiny", full_res_convs=1)
    with pytest.raises(ConfigError, match="full_res_convs must be >= 0"):
        preset_config("m4oe-convnext-s", full_res_convs=-1)
    # bundles written before the field existed read back without it
    older = {k: v for k, v in preset_config("m4oe-convnext-s").to_dict().items() if k != "full_res_convs"}
    assert ModelConfig.from_dict(older).full_res_convs == 0
    assert preset_config("m4oe-convnext-s", img_size=144).img_size == 144  # no window constraint


def test_batch_dice_against_hand_computed_value():
    # 2 samples of 1x2 pixels, classes background / a / b; sample 1's dataset lacks class b
    probs = torch.tensor([[[[0.5, 0.0]], [[0.5, 1.0]], [[0.0, 0.0]]],
                          [[[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0]]]])  # fmt: skip
    target = torch.tensor([[[1, 1]], [[2, 0]]])
    classes = torch.tensor([[True, True, False], [True, True, True]])
    # class a: I = 0.5 + 1 = 1.5, P = 1.5, T = 2 -> 3 / 3.5;  class b (sample 2 only): I = 1, P = 1, T = 1 -> 1
    expected = (3 / 3.5 + 1.0) / 2
    assert soft_dice_batch(probs, target, classes).item() == pytest.approx(expected, abs=1e-5)


def test_deep_supervision_loss_weights_and_subsampled_targets():
    torch.manual_seed(3)
    logits, coarse = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    classes = torch.ones(2, 3, dtype=torch.bool)
    full = segmentation_loss(logits, target, classes)[0]
    # the coarse output is scored against every second pixel of the label map, with weight 1/2
    half = segmentation_loss(coarse, target[:, 0::2, 0::2], classes)[0]
    loss, _ = deep_supervision_loss(logits, [coarse], target, classes)
    assert loss.item() == pytest.approx((full.item() + 0.5 * half.item()) / 1.5, rel=1e-6)


def _batch_dice_loop(probs, target, classes, dataset, present_only=False):
    """Reference: for each dataset in the batch and each of its foreground classes (with
    ``present_only``, those in the dataset's reference or argmax prediction), the Dice of the class
    summed over that dataset's samples; the mean over those pairs."""
    scores = []
    for d in sorted(set(dataset.tolist())):
        rows = [i for i in range(len(dataset)) if dataset[i] == d]
        for k in range(1, probs.shape[1]):
            if not classes[rows[0], k]:
                continue
            seen = any(bool((target[i] == k).any() or (probs[i].argmax(0) == k).any()) for i in rows)
            if present_only and not seen:
                continue
            inter = sum(float((probs[i, k] * (target[i] == k)).sum()) for i in rows)
            size = sum(float(probs[i, k].sum() + (target[i] == k).sum()) for i in rows)
            scores.append((2 * inter + 1e-5) / (size + 1e-5))
    return sum(scores) / len(scores)


def test_batch_dice_is_taken_within_each_dataset():
    torch.manual_seed(0)
    probs = torch.randn(7, 5, 6, 6).softmax(1)
    target = torch.randint(0, 5, (7, 6, 6))
    dataset = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    own = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    classes = own[dataset]
    target = torch.where(classes.gather(1, target.flatten(1)).view_as(target), target, 0)
    expected = _batch_dice_loop(probs, target, classes, dataset)
    assert soft_dice_batch(probs, target, classes, dataset).item() == pytest.approx(expected, rel=1e-5)
    # pooling class 2 over the datasets (the old behaviour) gives another value
    assert soft_dice_batch(probs, target, classes).item() != pytest.approx(expected, rel=1e-3)


def test_batch_present_dice_counts_only_present_or_predicted_classes():
    torch.manual_seed(1)
    logits = torch.randn(6, 6, 8, 8)
    logits[:, 4] -= 20  # class 4: never the argmax, absent from every reference
    probs = logits.softmax(1)
    target = torch.randint(0, 4, (6, 8, 8))
    target[3:][target[3:] == 3] = 0  # class 3 absent from dataset 1's reference ...
    probs = probs.clone()
    probs[3:, 3] = 0.0  # ... and never its argmax there
    dataset = torch.tensor([0, 0, 0, 1, 1, 1])
    classes = torch.ones(6, 6, dtype=torch.bool)
    expected = _batch_dice_loop(probs, target, classes, dataset, present_only=True)
    got = soft_dice_batch(probs, target, classes, dataset, present_only=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(soft_dice_batch(probs, target, classes, dataset).item(), rel=1e-3)
    loss, _ = segmentation_loss(logits, target, classes, dice="batch_present", dataset=dataset)
    assert torch.isfinite(loss)


def test_batch_present_dice_does_not_reward_crushing_an_absent_class():
    # one sample, class 2 absent: nnU-Net's batch Dice scores it smooth / (sum p + smooth), so
    # lowering its probability from 1e-4 to 1e-7 per pixel raises the score; batch_present ignores it
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    classes = torch.ones(1, 3, dtype=torch.bool)

    def probs(p_absent: float) -> torch.Tensor:
        out = torch.zeros(1, 3, 4, 4)
        out[0, 0], out[0, 1], out[0, 2] = 0.2, 0.8 - p_absent, p_absent
        out[0, 0, :2], out[0, 1, :2] = 0.2 - p_absent, 0.8
        out[0, 0, 2:], out[0, 1, 2:] = 0.8 - p_absent, 0.2
        return out

    high, low = probs(1e-4), probs(1e-7)
    assert soft_dice_batch(low, target, classes).item() > soft_dice_batch(high, target, classes).item() + 0.4
    # class 1 alone counts: I = 8 x 0.8 = 6.4, P = 8 x 0.8 + 8 x 0.2 = 8, T = 8 -> 12.8 / 16
    for p in (high, low):
        assert soft_dice_batch(p, target, classes, present_only=True).item() == pytest.approx(0.8, abs=1e-4)


def test_batch_dice_of_a_poorly_segmented_dataset_is_not_hidden_by_another():
    # class 1 is perfect on dataset 0's large organ and missed on dataset 1's small one
    probs = torch.zeros(2, 2, 4, 4)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :, :3] = 1  # 12 pixels, predicted
    target[1, 0, 0] = 1  # 1 pixel, missed
    probs[:, 0] = 1.0
    probs[0, 0, :, :3], probs[0, 1, :, :3] = 0.0, 1.0
    classes = torch.ones(2, 2, dtype=torch.bool)
    per_dataset = soft_dice_batch(probs, target, classes, torch.tensor([0, 1]))
    assert per_dataset.item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-4)
    assert soft_dice_batch(probs, target, classes).item() == pytest.approx(24 / 25, abs=1e-4)
