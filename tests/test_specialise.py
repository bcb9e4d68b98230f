"""Ways to make the experts modality experts (issue #29): the auxiliary routing loss against a hand
computation, the routing curriculum against hard routing's own code path, their schedules, and a short
run on phantoms in which the loss makes the gates route by modality."""

from __future__ import annotations

import json
import math

import pytest
import torch

from m4oe.config import ConfigError, TrainConfig
from m4oe.model.moe import MoEMLP
from m4oe.train.finetune import SegmentationTask, own_expert_loss


def test_the_routing_loss_by_hand():
    layer = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],     # sample 0, own expert 0
                          [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]])  # sample 1, own expert 2  # fmt: skip
    other = torch.full((2, 1, 3), 1 / 3)
    expected_first = -(math.log(0.5) + math.log(0.1) + math.log(0.6) + math.log(0.4)) / 4
    expected = (expected_first + math.log(3)) / 2  # the mean over the two layers
    assert own_expert_loss([layer, other], torch.tensor([0, 2])).item() == pytest.approx(expected, rel=1e-6)


def test_the_curriculum_mixes_soft_and_hard_routing():
    torch.manual_seed(0)
    moe = MoEMLP(8, 16, 3)
    with torch.no_grad():
        moe.gate.weight.normal_()
    x, modality = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 2])
    soft, _ = moe(x, modality, "soft")
    hard, _ = moe(x, modality, "hard")  # its own code path: grouped GEMMs over each sample's expert
    moe.own_share = 0.3
    mixed, gates = moe(x, modality, "soft")
    assert torch.allclose(mixed, 0.7 * soft + 0.3 * hard, atol=1e-5)
    assert torch.allclose(gates.sum(-1), torch.ones(4, 5))
    assert (gates[torch.arange(4), :, modality] >= 0.3).all()
    moe.own_share = 1.0
    assert torch.allclose(moe(x, modality, "soft")[0], hard, atol=1e-5)


class _Model:
    shares: list[float]

    def __init__(self):
        self.shares = []

    def set_own_share(self, share):
        self.shares.append(share)


def test_the_schedules_of_the_loss_weight_and_the_curriculum():
    task = SegmentationTask.__new__(SegmentationTask)
    task.model, task.routing, task.progress = _Model(), "soft", 0.0
    task.route_weight, task.route_decay, task.handover = 0.2, 0.5, 0.25
    weights = []
    for progress in (0.0, 0.125, 0.25, 0.5, 0.75):
        task.set_progress(progress)
        weights.append(task.routing_loss_weight())
    assert weights == pytest.approx([0.2, 0.15, 0.1, 0.0, 0.0])
    assert task.model.shares == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])
    task.routing = "hard"  # nothing to pull towards: the gates are not used
    assert task.routing_loss_weight() == 0.0


def test_the_settings_are_checked():
    with pytest.raises(ConfigError, match="train.handover must be a fraction"):
        TrainConfig(handover=1.5)
    with pytest.raises(ConfigError, match="train.route_weight must be 0 or more"):
        TrainConfig(route_weight=-1.0)


@pytest.mark.slow
def test_the_routing_loss_makes_the_gates_route_by_modality(tmp_path):
    from m4oe.train.finetune import run_train

    from .data_helpers import make_dataset
    from .test_train import experiment

    make_dataset(tmp_path / "synthetic" / "BTCV", n=4)
    make_dataset(tmp_path / "synthetic" / "CHAOS", n=4, modality="MRI")
    figures = {}
    for weight in (0.0, 1.0):
        exp = experiment(tmp_path, epochs=1, samples_per_epoch=240, val_every=1, route_weight=weight)
        run_train(exp, tmp_path / f"w{weight}", tmp_path / "cache", progress=False)
        validation = json.loads((tmp_path / f"w{weight}" / "validation.json").read_text())
        figures[weight] = validation["routing"]["specialisation"]
    assert figures[1.0] > 0.3 and figures[1.0] > 5 * figures[0.0], figures  # 0.44 vs 0.00 on this machine


def _shared_model():
    from m4oe import create_model

    torch.manual_seed(0)
    model = create_model("m4oe-convnext-s", modalities=["CT", "MRI"], label_sets={"a": ["background", "liver"]},
                         img_size=64, depths=(0, 1, 1, 1), shared_expert=True)  # fmt: skip
    with torch.no_grad():  # the shared expert's output is not zero
        for module in model.modules():
            if isinstance(module, MoEMLP):
                module.shared.fc2.weight.normal_(0, 0.3)
    return model.eval()


def test_a_shared_expert_is_counted_saved_and_kept_by_add_modality(tmp_path):
    from m4oe import load_bundle, save_bundle
    from m4oe.model.presets import parameter_counts
    from m4oe.train.add_modality import freeze_old, grow_model

    model = _shared_model()
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert layers and all(m.shared is not None for m in layers)
    # by hand: E experts and one shared expert, each C -> H -> C with biases
    expected = sum((2 + 1) * (2 * m.hidden * m.dim + m.hidden + m.dim) for m in layers)
    assert parameter_counts(model)["experts"] == expected
    image, dataset = torch.randn(2, 1, 64, 64), torch.zeros(2, dtype=torch.long)
    save_bundle(model, tmp_path / "b", extra={})
    loaded = load_bundle(tmp_path / "b").eval()
    assert loaded.config.shared_expert
    with torch.no_grad():
        assert torch.equal(loaded(image, 1, dataset), model(image, 1, dataset))
        grown = grow_model(model, "cineMRI", {"b": ["background", "heart"]}, close_to_old=True).eval()
        for modality in (0, 1):  # the old modalities meet exactly the old weights, shared expert included
            assert torch.allclose(grown(image, modality, dataset)[:, :2], model(image, modality, dataset), atol=1e-5)
    shared = {n: p for n, p in grown.named_parameters() if ".shared." in n}
    assert shared and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in shared.items())
    freeze_old(grown, old_classes=2, old_experts=2)
    assert not any(p.requires_grad for p in shared.values())  # learnt on the old data: frozen with it
