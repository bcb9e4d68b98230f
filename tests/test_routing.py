"""The routing report: the specialisation figure against hand-computed values, and the whole report on a
model whose gates are set by hand (one that sends each modality to its own expert, one that cannot
tell modalities apart)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from m4oe import create_model, save_bundle
from m4oe.config import parse_experiment
from m4oe.data.loader import SliceCache
from m4oe.data.prepare import prepare
from m4oe.eval.routing import markdown, routing_figures, routing_report, specialisation

from .conftest import MICRO
from .data_helpers import make_dataset


def test_specialisation_by_hand():
    assert specialisation(np.eye(3)) == pytest.approx(1.0)  # each modality its own expert only
    assert specialisation(np.full((3, 3), 1 / 3)) == pytest.approx(0.0)  # one mixture for all
    assert specialisation([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]) == pytest.approx(0.0)
    # p(m, e) = [[.45, .05], [.05, .45]], p(m) = p(e) = .5: I = .9 ln 1.8 + .1 ln .2 = 0.36806 nats; / ln 2
    assert specialisation([[0.9, 0.1], [0.1, 0.9]]) == pytest.approx(0.36806 / math.log(2), abs=1e-4)
    # two modalities sharing expert 0, a third on expert 2: I = ln 3 - (2/3) ln 2 nats; / ln 3
    shared = [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert specialisation(shared) == pytest.approx(1 - (2 / 3) * math.log(2) / math.log(3), abs=1e-6)
    assert math.isnan(specialisation([[1.0, 0.0]]))


def test_routing_figures_per_block_and_own_expert():
    gates = {"CT": [[0.8, 0.2], [0.5, 0.5]], "MRI": [[0.2, 0.8], [0.5, 0.5]]}
    figures = routing_figures(gates, ["CT", "MRI"], ["enc0.0", "dec0.0"])
    assert [b["own_expert_weight"] for b in figures["blocks"]] == [0.8, 0.5]
    assert figures["blocks"][1]["specialisation"] == 0.0 and figures["blocks"][0]["specialisation"] > 0.2
    assert figures["own_expert_weight"] == pytest.approx(0.65)
    assert figures["specialisation"] == pytest.approx(figures["blocks"][0]["specialisation"] / 2, abs=1e-4)


def _hand_set(model, by_modality: bool) -> None:
    """Every gate's logit for expert e: 100 x (token + embedding of the modality)[e]; the embedding puts
    100 at its own modality's index, so the own expert wins every token (or, without it, nothing
    tells the modalities apart: the same mixture for all)."""
    from m4oe.model.moe import MoEMLP

    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, MoEMLP)):
            experts = layer.num_experts
            layer.gate.weight.zero_()
            layer.gate.bias.zero_()
            layer.gate.weight[:, :experts] = 100 * torch.eye(experts)
            layer.modality_embed.weight.zero_()
            if by_modality:
                layer.modality_embed.weight[:, :experts] = 100 * torch.eye(experts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    values = {"model": {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}},
              "datasets": [{"path": str(make_dataset(root / "a", n=3)), "name": "a", "modality": "CT",
                            "normalization": "none", "split": {"val": ["case_002"]}},
                           {"path": str(make_dataset(root / "b", n=3, modality="MRI")), "name": "b",
                            "modality": "MRI", "normalization": "none", "split": {"val": ["case_002"]}}]}  # fmt: skip
    prepare(parse_experiment(values), root / "cache", progress=False)
    return SliceCache(root / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("by_modality, expected", [(True, 1.0), (False, 0.0)])
def test_the_report_of_models_with_gates_set_by_hand(cache, tmp_path, by_modality, expected):
    model = create_model("tiny", modalities=cache.modalities, label_sets=cache.label_sets, gate_modality=True, **MICRO)
    _hand_set(model, by_modality)
    report = routing_report(model, cache, torch.device("cpu"), batch_size=8)
    assert report["modalities"] == ["CT", "MRI"] and len(report["blocks"]) == len(model.gate_names()) == 14
    assert report["specialisation"] == pytest.approx(expected, abs=0.02)
    assert report["own_expert_weight"] == pytest.approx(1.0 if by_modality else 0.5, abs=0.02)
    assert set(report["dice"]) == {"soft", "hard", "uniform"} and set(report["dice"]["soft"]) == {"a", "b"}
    if by_modality:  # the gate already sends each modality to its own expert: hard routing is the same model
        assert report["dice"]["hard"] == report["dice"]["soft"]
    assert model.config.routing == "soft" and report["routing"] == "soft"  # restored, and said
    assert "routes hard" not in markdown(report)
    model.set_routing("hard")  # a model trained with hard routing (train.routing: hard) is saved so
    said = markdown(routing_report(model, cache, torch.device("cpu"), 8))
    assert "routes hard (it was trained so)" in said and "its specialisation is 1" in said
    assert f"Its unused gate: specialisation {report['specialisation']:.3f}" in said  # the same gates, named unused
    assert model.config.routing == "hard"
    model.set_routing("soft")
    extra = {"datasets": {n: {"modality": m, "normalization": {"scheme": "none"}, "label_values": {}}
                          for n, m in (("a", "CT"), ("b", "MRI"))}}  # fmt: skip
    save_bundle(model, tmp_path / "bundle", extra=extra)
    from m4oe.cli import app

    result = CliRunner().invoke(app, ["routing", "-m", str(tmp_path / "bundle"), "--cache", str(cache.path),
                                      "-o", str(tmp_path / "routing.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "routing.json").read_text())
    assert written["specialisation"] == report["specialisation"] and "| soft |" in result.output
    assert (tmp_path / "routing.md").read_text().startswith("| routing | a | b |")


def test_one_modality_has_no_specialisation_and_no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = routing_figures({"CT": [[0.6, 0.4]]}, ["CT", "MRI"], ["enc0.0"])
    assert math.isnan(figures["specialisation"]) and figures["own_expert_weight"] == 0.6
