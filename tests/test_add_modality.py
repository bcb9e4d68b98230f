"""add-modality: growth of experts, gates and head; frozen old behaviour; the grown bundle predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m4oe import create_model, load_bundle, save_bundle
from m4oe.config import parse_experiment
from m4oe.infer.predict import Predictor
from m4oe.train.add_modality import closest_pathway, grow_model, run_add_modality

from .conftest import MICRO
from .data_helpers import make_dataset

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out

OLD_SETS = {"ct": ["background", "liver", "spleen"], "mr": ["background", "liver", "spleen"]}
NONE = {"scheme": "none"}
OLD_EXTRA = {"datasets": {name: {"modality": m, "normalization": NONE, "label_values": {"liver": 1, "spleen": 2}}
                          for name, m in (("ct", "CT"), ("mr", "MRI"))},
             "postprocessing": {"keep_largest": {"ct": ["liver"], "mr": []}}}  # fmt: skip


def old_model():
    torch.manual_seed(1)
    model = create_model("tiny", modalities=["CT", "MRI"], label_sets=OLD_SETS, **MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # experts (and everything else) differ
    return model


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    save_bundle(old_model(), root / "old", extra=OLD_EXTRA)
    heart = make_dataset(root / "heart", n=3, modality="cineMRI",
                         labels={"background": 0, "liver": 1, "myocardium": 2})  # fmt: skip
    experiment = parse_experiment(
        {
            "datasets": [
                {"path": str(heart), "name": "heart", "normalization": "none", "split": {"val": ["case_002"]}}
            ],
            "train": {"epochs": 2, "batch_size": 4, "samples_per_epoch": 16, "workers": 0, "val_every": 1, "lr": 0.01},
        }
    )
    history, info = run_add_modality(root / "old", experiment, root / "run", root / "cache", "freeze_old",
                                     progress=False)  # fmt: skip
    return root, history, info


def test_only_freeze_old_closes_the_new_expert_to_old_modalities():
    heart = {"heart": ["background", "liver", "myocardium"]}
    assert grow_model(old_model(), "cineMRI", heart).config.closed_experts == ()
    closed = grow_model(old_model(), "cineMRI", heart, close_to_old=True)
    assert closed.config.closed_experts == ((0, 2), (1, 2))
    grown_again = grow_model(closed, "PET", {"pet": ["background", "liver"]}, close_to_old=True)
    assert grown_again.config.closed_experts == ((0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


def test_closed_experts_are_validated():
    from m4oe.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="own expert"):
        ModelConfig(closed_experts=[[1, 1]])
    with pytest.raises(ConfigError, match="index pairs"):
        ModelConfig(closed_experts=[1, 2])
    with pytest.raises(ConfigError, match="beyond the modalities"):
        create_model("tiny", modalities=["CT", "MRI"], label_sets=OLD_SETS, closed_experts=[[0, 2]], **MICRO)


def test_grow_adds_one_expert_gate_output_and_new_head_rows():
    old = old_model()
    new = grow_model(old, "cineMRI", {"heart": ["background", "liver", "myocardium"]})
    assert new.modalities == ["CT", "MRI", "cineMRI"]
    assert new.class_names == ["background", "liver", "spleen", "myocardium"]  # liver reused
    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    layers = [n for n in new_params if n.endswith("mlp.w1")]
    assert len(layers) == 14
    for name in layers:
        stem = name[: -len("w1")]
        assert new_params[name].shape[0] == 3 and torch.equal(new_params[name][:2], old_params[name])
        assert new_params[stem + "gate.weight"].shape[0] == 3
        assert torch.equal(new_params[stem + "gate.bias"][:2], old_params[stem + "gate.bias"])
        assert torch.all(new_params[stem + "gate.weight"][2] == 0)
    assert torch.equal(new_params["head.proj.weight"][:3], old_params["head.proj.weight"])
    assert new.head.label_mask.tolist()[2] == [True, True, False, True]


def test_freeze_old_keeps_old_predictions(grown):
    root, _, info = grown
    old = load_bundle(root / "old").eval()
    new = load_bundle(root / "run" / "last").eval()
    assert info["modality"] == "cineMRI" and new.modalities == ["CT", "MRI", "cineMRI"]
    image = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    for modality, dataset in ((0, 0), (1, 1)):
        ds = torch.full((3,), dataset)
        with torch.no_grad():
            before = old(image, modality, ds, routing="hard")
            after = new(image, modality, ds, routing="hard")
            before_soft = old(image, modality, ds, routing="soft")
            after_soft, gates = new(image, modality, ds, routing="soft", return_gates=True)
        # hard routing: bitwise the same logits for every old class
        assert torch.equal(after[:, :3], before)
        # soft routing: the new expert is closed to old modalities (gate logit -inf), every other
        # weight they meet is frozen, so the logits are the old ones up to float rounding (the mixing
        # GEMM now also sums the new expert's zero-weighted hidden units)
        assert all(torch.all(g[..., 2] == 0) for g in gates)
        assert torch.allclose(after_soft[:, :3], before_soft, atol=1e-5, rtol=1e-5)
    assert new.config.closed_experts == ((0, 2), (1, 2))  # kept in the bundle
    with torch.no_grad():
        _, gates = new(image, 2, torch.full((3,), 2), routing="soft", return_gates=True)
    assert min(float(g[..., 2].mean()) for g in gates) > 0  # the new modality does use its expert
    with pytest.raises(ValueError, match="modality of every sample"):
        new(image, None, torch.full((3,), 0), routing="soft")
    # ... while the new expert did train
    w1 = "encoder.0.blocks.0.mlp.w1"
    assert not torch.equal(new.state_dict()[w1][2], old.state_dict()[w1][0])


def test_parameters_added_are_reported(grown):
    root, _, info = grown
    added = json.loads((root / "run" / "added.json").read_text())
    old, new = load_bundle(root / "old"), load_bundle(root / "run" / "last")
    assert added["total"] == sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in old.parameters())
    assert added["total"] == added["expert"] + added["gates"] + added["head"]
    assert added["head"] == 16  # one new class (myocardium) x 16 channels
    assert info["parameters_added"] == {k: added[k] for k in ("total", "expert", "gates", "head")}


def test_grown_bundle_predicts_for_all_datasets(grown):
    root, _, _ = grown
    predictor = Predictor(load_bundle(root / "run" / "last"))
    volume_shape = (3, 40, 30)
    from m4oe.data.io import Geometry, Volume

    volume = Volume(np.random.default_rng(0).normal(size=volume_shape).astype(np.float32),
                    Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), "LPS",
                    (2.0, 1.0, 1.0))  # fmt: skip
    for dataset, values in (("ct", {0, 1, 2}), ("mr", {0, 1, 2}), ("heart", {0, 1, 2})):
        result = predictor.predict_volume(volume, dataset)
        assert result.labels.shape == volume_shape
        assert set(np.unique(result.labels)) <= values
    assert predictor.resolve("heart", None).classes == ["background", "liver", "myocardium"]
    # the old datasets keep their post-processing (frozen), the new one gets its own from validation
    choice = predictor.model.bundle_extra["postprocessing"]["keep_largest"]
    assert choice["ct"] == ["liver"] and choice["mr"] == [] and "heart" in choice


def test_config_without_a_new_modality_is_rejected(tmp_path):
    save_bundle(old_model(), tmp_path / "old", extra=OLD_EXTRA)
    ct2 = make_dataset(tmp_path / "ct2", n=2, modality="CT")
    experiment = parse_experiment({"datasets": [{"path": str(ct2), "name": "ct2"}], "train": {"workers": 0}})
    with pytest.raises(ValueError, match="exactly one new modality"):
        run_add_modality(tmp_path / "old", experiment, tmp_path / "run", tmp_path / "cache", progress=False)


def test_pretrain_option_trains_only_the_new_expert_first(tmp_path):
    save_bundle(old_model(), tmp_path / "old", extra=OLD_EXTRA)
    heart = make_dataset(tmp_path / "heart", n=2, modality="cineMRI",
                         labels={"background": 0, "liver": 1, "myocardium": 2})  # fmt: skip
    experiment = parse_experiment(
        {
            "datasets": [{"path": str(heart), "name": "heart", "normalization": "none", "split": {"val": []}}],
            "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "workers": 0,
                      "val_every": 0, "lr": 0.01, "pretrain_lr": 0.01},
        }
    )  # fmt: skip
    run_add_modality(tmp_path / "old", experiment, tmp_path / "run", tmp_path / "cache", "freeze_old",
                     pretrain=True, progress=False)  # fmt: skip
    assert (tmp_path / "run" / "pretrain" / "metrics.csv").is_file()
    old = dict(load_bundle(tmp_path / "old").named_parameters())
    new = dict(load_bundle(tmp_path / "run" / "last").named_parameters())
    name = "encoder.1.blocks.1.mlp.w2"
    assert torch.equal(new[name][:2], old[name])  # old experts untouched by both phases
    assert not any(torch.equal(new[name][2], old[name][e]) for e in range(2))  # the new one learnt
    assert torch.equal(new["encoder.0.blocks.0.attn.qkv.weight"], old["encoder.0.blocks.0.attn.qkv.weight"])


def _reference_distance(model, own, new, m):
    """The standardised mean difference of the head's input features, computed from the model's parts."""

    def features(images):
        x, skips = model.encode(images, m, "hard", None)
        return model.decode(x, skips, m, "hard", None).double().numpy()

    a, b = features(own), features(new)
    total = 0.0
    for c in range(a.shape[1]):  # channel by channel
        total += abs(b[:, c].mean() - a[:, c].mean()) / (a[:, c].std(ddof=1) + 1e-6)
    return total / a.shape[1]


def test_closest_pathway_picks_the_modality_whose_own_data_the_new_data_matches():
    model = old_model().eval()
    torch.manual_seed(3)
    ct, mri = torch.randn(6, 1, 64, 64), torch.randn(6, 1, 64, 64) * 0.3 + 1.0
    new = mri + 0.01 * torch.randn_like(mri)  # the new modality looks like MRI
    best, distances = closest_pathway(model, new, {0: ct, 1: mri})
    assert best == 1 and distances["MRI"] < distances["CT"]
    with torch.no_grad():
        for m, name in enumerate(["CT", "MRI"]):
            own = (ct, mri)[m]
            assert distances[name] == pytest.approx(_reference_distance(model, own, new, m), rel=1e-3, abs=1e-4)


def test_hard_trained_model_copies_one_whole_pathway(tmp_path):
    old = old_model()
    old.set_routing("hard")
    save_bundle(old, tmp_path / "old", extra=OLD_EXTRA)
    mr = make_dataset(tmp_path / "mr", n=2, modality="MRI", labels={"background": 0, "liver": 1, "spleen": 2})
    heart = make_dataset(tmp_path / "heart", n=2, modality="cineMRI",
                         labels={"background": 0, "liver": 1, "myocardium": 2})  # fmt: skip
    experiment = parse_experiment(
        {
            "datasets": [{"path": str(mr), "name": "mr", "normalization": "none", "split": {"val": []}},
                         {"path": str(heart), "name": "heart", "normalization": "none", "split": {"val": []}}],
            "train": {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "workers": 0, "val_every": 0,
                      "lr": 1e-9},
        }
    )  # fmt: skip
    run_add_modality(tmp_path / "old", experiment, tmp_path / "run", tmp_path / "cache", "freeze_old",
                     progress=False)  # fmt: skip
    record = json.loads((tmp_path / "run" / "added.json").read_text())["new_expert_from"]
    assert record["rule"] == "the closest old pathway" and record["modality"] == "MRI"
    assert set(record["distances"]) == {"MRI"}  # only MRI's own data is in the config
    new = dict(load_bundle(tmp_path / "run" / "last").named_parameters())
    experts = {k: v for k, v in old.named_parameters() if k.endswith("mlp.w1")}
    assert len(experts) > 1
    for name, value in experts.items():
        # MRI's expert in every layer (lr 1e-9: still as copied), not CT's
        assert torch.allclose(new[name][2], value[1], atol=1e-6), name
        assert not torch.allclose(new[name][2], value[0], atol=1e-3), name
