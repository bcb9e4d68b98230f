"""The fast M4oE layer against a plain loop over experts and samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m4oe.model.moe import DenseMLP, MoEMLP


def expert(layer: MoEMLP, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, layer.w1[e], layer.b1[e])), layer.w2[e], layer.b2[e])


def loop_reference(layer: MoEMLP, x: torch.Tensor, modality: torch.Tensor, routing: str) -> torch.Tensor:
    """The M4oE equations written plainly: one sample and one expert at a time (plus the shared
    expert, unweighted, when the layer has one)."""
    E = layer.num_experts
    outputs = []
    for b in range(x.shape[0]):
        shared = 0.0
        if layer.shared is not None:
            fc1, fc2 = layer.shared.fc1, layer.shared.fc2
            shared = F.linear(F.gelu(F.linear(x[b], fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        if routing == "hard":
            outputs.append(expert(layer, int(modality[b]), x[b]) + shared)
            continue
        if routing == "soft":
            gates = torch.softmax(layer.gate(x[b]), dim=-1)
        else:
            gates = torch.full((x.shape[1], E), 1.0 / E, dtype=x.dtype)
        out = sum(gates[:, e : e + 1] * expert(layer, e, x[b]) for e in range(E))
        outputs.append(out + shared)
    return torch.stack(outputs)


def make_layer(E: int = 3, C: int = 12, H: int = 20, shared: bool = False) -> MoEMLP:
    layer = MoEMLP(C, H, E, shared=shared).double()
    with torch.no_grad():  # break the symmetric init so that experts and biases differ
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("routing", ["soft", "hard", "uniform"])
def test_fast_matches_loop_reference_forward_and_gradients(routing, shared):
    layer = make_layer(shared=shared)
    x = torch.randn(5, 7, 12, dtype=torch.float64, requires_grad=True)
    modality = torch.tensor([2, 0, 1, 1, 0])
    fast, _ = layer(x, modality, routing)
    ref = loop_reference(layer, x, modality, routing)
    assert rel_err(fast, ref) < 1e-10
    grad_out = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, [x, *layer.parameters()], grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], grad_out, allow_unused=True)
    for (name, _), g_fast, g_ref in zip([("x", x), *layer.named_parameters()], fast_grads, ref_grads, strict=True):
        if g_ref is None:
            assert g_fast is None or g_fast.abs().max() == 0, name
            continue
        assert rel_err(g_fast, g_ref) < 1e-10, name


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("routing", ["soft", "hard", "uniform"])
def test_fast_matches_reference_in_float32(routing, shared):
    layer = make_layer(shared=shared).float()
    x = torch.randn(4, 49, 12)
    modality = torch.tensor([0, 1, 2, 0])
    fast, _ = layer(x, modality, routing)
    assert rel_err(fast, loop_reference(layer, x, modality, routing)) < 1e-5


def test_gate_is_a_distribution_over_experts():
    layer = make_layer()
    x = torch.randn(3, 10, 12, dtype=torch.float64)
    _, gates = layer(x, torch.tensor([0, 1, 2]), "soft")
    assert gates.shape == (3, 10, 3)
    assert torch.all(gates > 0)
    assert torch.allclose(gates.sum(-1), torch.ones(3, 10, dtype=torch.float64))
    # The gate depends on the token (softmax over experts, per token), not a constant.
    assert gates.std(dim=1).max() > 1e-3


def test_hard_routing_equals_the_chosen_expert_alone():
    layer = make_layer()
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    modality = torch.tensor([1, 1, 0, 2])
    out, gates = layer(x, modality, "hard")
    for b in range(4):
        alone = MoEMLP(12, 20, 1).double()
        with torch.no_grad():
            e = int(modality[b])
            alone.w1[0], alone.b1[0], alone.w2[0], alone.b2[0] = layer.w1[e], layer.b1[e], layer.w2[e], layer.b2[e]
        expected, _ = alone(x[b : b + 1], torch.zeros(1, dtype=torch.long), "soft")
        assert torch.allclose(out[b : b + 1], expected, atol=1e-12)
        assert torch.equal(gates[b, 0], F.one_hot(modality[b], 3).double())


def test_hard_routing_rejects_missing_or_bad_modality():
    layer = make_layer()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="modality"):
        layer(x, None, "hard")
    with pytest.raises(ValueError, match="out of range"):
        layer(x, torch.tensor([0, 3]), "hard")


def test_gate_modality_embedding_changes_the_gate():
    layer = MoEMLP(12, 20, 3, gate_modality=True).double()
    with torch.no_grad():
        layer.modality_embed.weight.normal_(0, 1.0)
    x = torch.randn(1, 5, 12, dtype=torch.float64).expand(3, 5, 12)
    _, gates = layer(x, torch.tensor([0, 1, 2]), "soft")
    assert not torch.allclose(gates[0], gates[1])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("hidden_ratio", [1, 3])
def test_experts_initialised_from_dense_mlp(hidden_ratio, shared):
    """Full-width experts copy the dense MLP (any gate gives it back); split experts sum to it; a
    shared expert starts silent."""
    C, H = 12, 24
    dense = DenseMLP(C, H).double()
    E = 3
    layer = MoEMLP(C, H // E if hidden_ratio == 3 else H, E, shared=shared).double()
    layer.load_dense(dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias)
    x = torch.randn(2, 5, C, dtype=torch.float64)
    expected, _ = dense(x)
    routing = "soft" if hidden_ratio == 1 else "uniform"
    out, _ = layer(x, torch.tensor([0, 2]), routing)
    assert torch.allclose(out, expected, atol=1e-12)


def test_hard_routing_with_one_shared_expert_equals_per_sample_routing():
    layer = make_layer()
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    per_sample, gates = layer(x, torch.full((4,), 2), "hard")
    shared, shared_gates = layer(x, 2, "hard")
    assert torch.allclose(shared, per_sample, atol=1e-12)
    assert torch.equal(shared_gates, gates)
    with pytest.raises(ValueError, match="out of range"):
        layer(x, 3, "hard")


@pytest.mark.parametrize("modality", [[2, 0, 1, 1, 0], [1, 1, 2, 1, 2]])  # unsorted; expert 0 unused
def test_hard_routing_of_a_mixed_batch_runs_grouped_gemms_matching_the_loop(modality, monkeypatch):
    """fp32 on the CPU: each sample through its own expert only, via two torch._grouped_mm calls."""
    layer = make_layer(C=16, H=24).float()  # rows of a multiple of 16 bytes in bf16 too
    x = torch.randn(5, 7, 16, requires_grad=True)
    modality = torch.tensor(modality)
    calls = []
    grouped_mm = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    fast, gates = layer(x, modality, "hard")
    assert calls == [(35, 16), (35, 24)]  # tokens x width: one expert per token, not E
    assert torch.equal(gates[:, 0], F.one_hot(modality, 3).float())
    ref = loop_reference(layer, x, modality, "hard")
    assert rel_err(fast, ref) < 1e-6
    grad_out = torch.randn_like(fast)
    params = [x, layer.w1, layer.b1, layer.w2, layer.b2]
    for g_fast, g_ref in zip(torch.autograd.grad(fast, params, grad_out), torch.autograd.grad(ref, params, grad_out),
                             strict=True):  # fmt: skip
        assert rel_err(g_fast, g_ref) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = layer(x, modality, "hard")
    assert low.dtype == torch.bfloat16 and rel_err(low.float(), ref) < 2e-2


def test_hard_routing_falls_back_to_one_hot_gates_where_grouped_gemms_are_off(monkeypatch):
    layer = make_layer(C=16, H=24).float()
    x = torch.randn(4, 6, 16)
    modality = torch.tensor([0, 2, 2, 1])
    grouped, _ = layer(x, modality, "hard")
    odd = make_layer(C=12, H=20).float()  # 12 bf16 values are 24 bytes: not a grouped-GEMM row
    with torch.autocast("cpu", dtype=torch.bfloat16):
        odd_out, _ = odd(torch.randn(4, 6, 12), modality, "hard")
    assert odd_out.dtype == torch.bfloat16
    monkeypatch.setattr(MoEMLP, "grouped_devices", frozenset())
    one_hot, _ = layer(x, modality, "hard")
    assert rel_err(one_hot, grouped) < 1e-6


def test_a_shared_expert_is_added_to_one_scans_hard_routed_output():
    """One scan's path (an ``int`` modality: the chosen expert's weights alone) plus the shared expert."""
    layer = make_layer(shared=True)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    out, _ = layer(x, 1, "hard")
    assert rel_err(out, loop_reference(layer, x, torch.tensor([1, 1]), "hard")) < 1e-10
    without = expert(layer, 1, x)
    assert rel_err(out - without, layer.shared(x)[0]) < 1e-10
    assert (out - without).abs().max() > 1e-3  # the shared expert is not silent after training-like weights
