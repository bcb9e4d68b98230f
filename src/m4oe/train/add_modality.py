"""``m4oe add-modality``: grow a trained model by one modality expert and the new data's labels.

Every M4oE layer gets one more expert and every gate one more output; the head gets rows for the new
dataset's labels that the vocabulary does not have yet (labels of the same name are reused). The new
expert starts as a copy of old experts (or, with ``pretrain``, from a phase-1 MAE pre-training of the new
expert alone on the new data): for a model that routes by its gate, per layer the old expert the gate
favours most on the new data; for a model trained with hard routing, whose gate never learnt, one old
modality's whole pathway (its expert in every layer, which were trained together), the modality whose
pathway gives the new images features closest to those of its own images (``closest_pathway``).

Two ways to train it:

* ``freeze_old``: only the new expert, the new gate row (and modality embedding) and the head rows of
  new classes learn; everything else is frozen, slices of stacked tensors included (their gradients
  are masked and they get no weight decay, so AdamW leaves them bit-exact). The new expert is also
  closed to the old modalities (``ModelConfig.closed_experts``: their gate logit for it is ``-inf``),
  so an old dataset's input meets exactly the old weights under soft routing as well: its output is
  the old model's up to float rounding (bitwise under hard routing). Without the closure the new gate
  row, trained on the new modality alone, learnt to take a large share of old tokens too: in the CPU
  pilot (docs/results.md, section 7) CHAOS validation Dice fell from 31.1 to 8.7 after adding cine MRI.
* full fine-tuning: everything learns, with the old datasets replayed when the config lists them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..bundle import BundleInfo, check_segmentation_bundle, load_bundle
from ..config import ExperimentConfig
from ..data.loader import SliceCache
from ..files import write_json
from ..model.base import SegmentationModel
from ..model.moe import MoEMLP
from ..model.presets import build_model
from .common import check_run_folders, ensure_cache, experiment_datasets, sampling_weights, write_run_config
from .finetune import SegmentationTask
from .loop import History, fit, setup_runtime
from .pretrain import batch_mask, pretrain_mask

NEW_GATE_BIAS = -4.0  # the new expert starts with a small share of every old token (e^-4 ~ 2%)


def grow_model(
    old: SegmentationModel, modality: str, label_sets: dict[str, list[str]], close_to_old: bool = False
) -> SegmentationModel:
    """A model with one more expert (``modality``) and the new datasets' label sets, old weights in.

    With ``close_to_old`` the soft gate never routes old modalities to the new expert.
    """
    if modality in old.modalities:
        raise ValueError(f"the model already has an expert for {modality!r}: {old.modalities}")
    clash = sorted(set(label_sets) & set(old.label_sets))
    if clash:
        raise ValueError(f"datasets {clash} are already in the model; give the new data other names")
    config = old.config
    if config.compute_matched and not config.matched_experts:
        # the old experts keep their width (hidden mlp_ratio * C / E_old), whatever the new count
        config = config.replace(matched_experts=len(old.modalities))
    if close_to_old:
        new_expert = len(old.modalities)
        config = config.replace(closed_experts=(*config.closed_experts, *((m, new_expert) for m in range(new_expert))))
    model = build_model(config, [*old.modalities, modality], {**old.label_sets, **label_sets})
    new_state = model.state_dict()
    old_state = old.state_dict()
    old_classes = [model.class_names.index(c) for c in old.class_names]
    roles = model.moe_parameter_roles()
    with torch.no_grad():
        for name, value in new_state.items():
            if name not in old_state:
                continue
            source = old_state[name]
            if name.endswith("label_mask") and name.split(".")[0] in ("head", "aux_heads"):
                continue
            if name.endswith("proj.weight") and name.split(".")[0] in ("head", "aux_heads"):
                value[old_classes] = source
            elif source.shape == value.shape:
                value.copy_(source)
            elif name in roles:  # stacked over experts (or modalities): the old rows, then the new one
                value[: source.shape[0]] = source
                if roles[name] == "gate_weight":
                    value[source.shape[0] :] = 0.0
                elif roles[name] == "gate_bias":
                    value[source.shape[0] :] = NEW_GATE_BIAS
            else:
                raise ValueError(f"cannot grow parameter {name}: {tuple(source.shape)} -> {tuple(value.shape)}")
    model.bundle_extra = dict(getattr(old, "bundle_extra", {}))
    return model


@torch.no_grad()
def favoured_experts(old: SegmentationModel, images: Tensor) -> list[int]:
    """Per M4oE layer, the old expert with the largest mean gate weight on ``images`` (soft routing).

    The new images have no modality of the old model, so the gates are averaged over the old
    model's modalities (a model that closes experts to some modalities, or whose gate sees the
    modality, needs one).
    """
    old.eval()
    total = None
    for m in range(old.num_experts):
        _, gates = old(images, m, None, return_gates=True, routing="soft")
        means = [g.float().mean(dim=(0, 1)) for g in gates]
        total = means if total is None else [t + g for t, g in zip(total, means, strict=True)]
    return [int(t.argmax()) for t in total]


@torch.no_grad()
def closest_pathway(
    old: SegmentationModel, new_images: Tensor, own_images: dict[int, Tensor]
) -> tuple[int, dict[str, float]]:
    """The old modality whose hard-routed pathway sees ``new_images`` most like its own data.

    For each old modality ``m`` with images in ``own_images``, both sets of images go through ``m``'s
    experts (hard routing) to the head's input; the distance is the mean over channels of
    ``|mean_new - mean_own| / std_own`` (a standardised mean difference). Returns the closest
    modality's index and every distance by modality name.
    """
    old.eval()
    distances = {}
    for m, images in own_images.items():
        own, new = _head_features(old, images, m), _head_features(old, new_images, m)
        spread = own.std(dim=(0, 2, 3)) + 1e-6
        distances[m] = float(((new.mean(dim=(0, 2, 3)) - own.mean(dim=(0, 2, 3))).abs() / spread).mean())
    best = min(distances, key=distances.__getitem__)
    return best, {old.modalities[m]: round(d, 4) for m, d in distances.items()}


def _head_features(model: SegmentationModel, images: Tensor, modality: int) -> Tensor:
    captured: list[Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float()))
    try:
        model(images, modality, None, routing="hard")
    finally:
        handle.remove()
    return captured[-1]


def source_experts(
    old: SegmentationModel, cache: SliceCache, new_slices: np.ndarray
) -> tuple[list[int], dict[str, Any]]:
    """Per M4oE layer, the old expert the new one starts from, and how it was chosen (for ``added.json``)."""
    train = cache.slice_mask("train")
    new_images = _sample_images(old, cache, train & new_slices)
    if old.config.routing != "hard":
        return favoured_experts(old, new_images), {"rule": "the gate's favourite per layer"}
    own = {}
    for m, name in enumerate(old.modalities):
        if name in cache.modalities:
            of_m = train & (cache.index["modality"] == cache.modalities.index(name)) & ~new_slices
            if of_m.any():
                own[m] = _sample_images(old, cache, of_m)
    if not own:
        print("warning: the model routes hard and the config lists none of its old datasets, so the new expert "
              "starts from the experts its untrained gate favours; list an old dataset in the config or use "
              "--pretrain", file=sys.stderr)  # fmt: skip
        return favoured_experts(old, new_images), {"rule": "the untrained gate's favourite per layer"}
    best, distances = closest_pathway(old, new_images, own)
    record = {"rule": "the closest old pathway", "modality": old.modalities[best], "distances": distances}
    return [best] * len(_gated_layers(old)), record


def _sample_images(old: SegmentationModel, cache: SliceCache, mask: np.ndarray, count: int = 32) -> Tensor:
    """Up to ``count`` slices of ``mask`` spread evenly over it, with the model's slice context."""
    slices = np.flatnonzero(mask)
    chosen = slices[np.linspace(0, len(slices) - 1, min(count, len(slices))).astype(int)]
    return torch.from_numpy(cache.read_context(chosen, old.config.slice_context)[0])


@torch.no_grad()
def init_new_expert(model: SegmentationModel, source_experts: list[int]) -> None:
    """Copy, layer by layer, the chosen old expert into the new (last) expert."""
    layers = _gated_layers(model)
    if len(layers) != len(source_experts):
        raise ValueError("one source expert per M4oE layer is needed")
    for layer, e in zip(layers, source_experts, strict=True):
        for p in (layer.w1, layer.b1, layer.w2, layer.b2):
            p[-1] = p[e]


def _gated_layers(model: SegmentationModel) -> list[MoEMLP]:
    """M4oE layers in the order their gates are returned (encoder first, then decoder as run)."""
    layers = [b.mlp for s in model.encoder for b in s.blocks if isinstance(b.mlp, MoEMLP)]
    for i in reversed(range(len(model.decoder))):
        layers += [b.mlp for b in model.decoder[i].blocks if isinstance(b.mlp, MoEMLP)]
    return layers


def freeze_old(model: SegmentationModel, old_classes: int, old_experts: int):
    """Freeze everything but the new expert, the new gate row and the new head rows.

    Returns the parameters whose frozen slices must get no weight decay, and the gradient-mask hook
    handles (``handle.remove()`` undoes the masking).
    """
    partial: list[nn.Parameter] = []
    handles = []
    new_classes = torch.ones(model.head.num_classes, dtype=torch.bool)
    new_classes[:old_classes] = False  # new classes are appended after the old vocabulary
    stacked = model.moe_parameter_roles()  # one row per expert (or modality) along dim 0
    for name, param in model.named_parameters():
        keep = None
        if name in stacked:
            keep = torch.zeros(param.shape[0], dtype=torch.bool)
            keep[old_experts:] = True
        elif name == "head.proj.weight":
            keep = new_classes
        if keep is None:
            param.requires_grad_(False)
            continue
        mask = keep.view(-1, *([1] * (param.ndim - 1))).to(param.dtype)
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device)))
        partial.append(param)
    return partial, handles


class AddModalityTask(SegmentationTask):
    name = "add-modality"

    def __init__(self, *args, no_decay: list[nn.Parameter] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._no_decay = no_decay or []

    def no_weight_decay(self) -> list[nn.Parameter]:
        return self._no_decay


def parameters_added(old: SegmentationModel, new: SegmentationModel) -> dict[str, int]:
    def count(model: SegmentationModel) -> int:
        return sum(p.numel() for p in model.parameters())

    experts = sum(p[-1].numel() for layer in _gated_layers(new) for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    gates = sum(layer.gate.weight.shape[1] + 1 for layer in _gated_layers(new))
    head = (new.head.num_classes - old.head.num_classes) * new.head.proj.weight.shape[1]
    return {"total": count(new) - count(old), "expert": experts, "gates": gates, "head": head}


def run_add_modality(
    bundle: str | Path,
    experiment: ExperimentConfig,
    out: str | Path,
    cache_dir: str | Path | None = None,
    mode: str = "freeze_old",
    pretrain: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> tuple[History, dict[str, Any]]:
    """Add the config's new modality to the model in ``bundle`` and train it; see the module docstring."""
    if mode not in ("freeze_old", "full"):
        raise ValueError(f"mode must be freeze_old or full, got {mode!r}")
    out = Path(out)
    check_run_folders(experiment, cache_dir, [out], resume=False)
    runtime = setup_runtime(device)
    old = load_bundle(bundle)
    check_segmentation_bundle(old, bundle)
    cache = ensure_cache(experiment, cache_dir, runtime, progress, img_size=old.config.img_size)
    clock = time.perf_counter()  # train.minutes counts the whole addition, the new expert's MAE included
    in_config = experiment_datasets(experiment, cache)
    new_datasets = [d for d in in_config if d not in old.label_sets]
    new_modalities = sorted({cache.dataset_modality[d] for d in new_datasets} - set(old.modalities))
    if len(new_modalities) != 1:
        raise ValueError(
            f"the config must bring exactly one new modality (the model has {old.modalities}); found "
            f"{new_modalities} in datasets {new_datasets}"
        )
    modality = new_modalities[0]
    model = grow_model(old, modality, {d: cache.label_sets[d] for d in new_datasets}, close_to_old=mode == "freeze_old")
    config = experiment.training
    torch.manual_seed(config.seed)
    new_slices = cache.dataset_mask(new_datasets)
    if pretrain:
        _pretrain_new_expert(model, experiment, cache, out / "pretrain", runtime, progress)
        initialised = {"rule": "MAE pre-training of the new expert"}
    else:
        chosen, initialised = source_experts(old, cache, new_slices)
        init_new_expert(model, chosen)
    no_decay = freeze_old(model, len(old.class_names), len(old.modalities))[0] if mode == "freeze_old" else []
    task = AddModalityTask.from_config(model, cache, config, runtime.device, no_decay=no_decay)
    info = BundleInfo.of(old)
    task.extra_datasets = {k: v for k, v in info.record.get("datasets", {}).items() if k in old.label_sets}
    if mode == "freeze_old":  # the old experts, gates and classes are frozen: their choice still holds
        task.carried_postprocessing = {k: v for k, v in info.keep_largest.items() if k not in cache.dataset_names}
    added = parameters_added(old, model)
    if runtime.main:
        write_run_config(out, experiment, {"phase": "add-modality", "base_model": str(bundle), "mode": mode,
                                           "new_modality": modality, "parameters_added": added})  # fmt: skip
        write_json(out / "added.json", {"modality": modality, "datasets": new_datasets, **added,
                                        "new_expert_from": initialised})  # fmt: skip
    config_slices = cache.dataset_mask(in_config)
    in_run = new_slices if mode == "freeze_old" else config_slices
    sampler_mask = cache.slice_mask("train") & in_run & cache.index["labeled"]
    history = fit(task, cache, config, out, runtime, epochs=config.epochs, lr=config.lr,
                  sampler_mask=sampler_mask, dataset_weights=sampling_weights(experiment, cache),
                  progress=progress, clock=clock,
                  budget_seconds=None if config.minutes is None else config.minutes * 60)  # fmt: skip
    return history, {"modality": modality, "datasets": new_datasets, "parameters_added": added}


class NewExpertMAETask:
    """Phase 1 for the new expert alone: MAE on the new modality's slices, routed to the new expert."""

    name = "pretrain-new-expert"

    def __init__(
        self, model: SegmentationModel, cache: SliceCache, mask_ratio: float, norm_pix_loss: bool, partial
    ) -> None:
        from ..model.mae import MAEPretrainer

        self.model, self.cache, self._partial = model, cache, partial
        self.module = MAEPretrainer(model, mask_ratio, norm_pix_loss)
        self.expert = model.num_experts - 1

    def loss(self, batch: dict[str, Tensor], module: nn.Module):
        loss, _ = module(batch["image"], self.expert, batch_mask(self.module, batch["image"]))
        return loss, {}

    def validate(self, autocast) -> None:
        return None

    def bundle_extra(self) -> dict[str, Any]:
        return dict(getattr(self.model, "bundle_extra", {}))

    def no_weight_decay(self) -> list[nn.Parameter]:
        return self._partial


def _pretrain_new_expert(model: SegmentationModel, experiment, cache: SliceCache, out: Path, runtime, progress) -> None:
    config = experiment.training
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    partial, handles = freeze_old(model, model.head.num_classes, model.num_experts - 1)
    experts = model.expert_parameter_names()
    for name, p in model.named_parameters():  # MAE trains the new expert only
        if name not in experts:
            p.requires_grad_(False)
    task = NewExpertMAETask(model, cache, config.mask_ratio, config.norm_pix_loss, partial)
    new_modality = cache.modalities.index(model.modalities[-1])
    mask = pretrain_mask(cache) & (cache.index["modality"] == new_modality)
    try:
        fit(task, cache, config, out, runtime, epochs=config.pretrain_epochs, lr=config.pretrain_lr,
            sampler_mask=mask, validate=False, progress=progress,
            samples_per_epoch=config.pretrain_samples_per_epoch)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
