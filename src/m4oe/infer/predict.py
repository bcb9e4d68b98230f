"""``m4oe predict``: volumes in, label maps out with the input's exact geometry.

Each volume is reoriented to the canonical axis order, normalised with the bundle's statistics of
the chosen dataset, sliced and fitted to the model input as in training, predicted in batches (bf16
on GPU), the logits (or the probabilities averaged over test-time views: mirrored, rotated) are
resampled back to the original slice grid before the argmax, and the label map is written in the
file's own orientation, spacing, origin and direction, with the chosen dataset's label numbers (or
union-vocabulary indices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..bundle import BundleInfo, check_segmentation_bundle
from ..config import ROUTING_MODES
from ..config.choices import PRECISIONS
from ..data.io import (
    Volume,
    flip_in_plane,
)
from ..data.normalize import normalize
from ..data.postprocess import keep_largest_components
from ..data.resample import SlicePlan, fit_slices, unfit_logits
from ..devices import resolve_device, uses_bf16
from ..memory import keep_freed_memory
from ..model.base import SegmentationModel
from ..model.head import class_argmax
from .engine import SliceEngine, SliceRequest
from .intensity_check import intensity_warnings, physical_input
from .orientation import ORIENTATIONS, flip_note, foreground_confidence, probe_indices
from .scan_warnings import edge_warnings, fov_edge_classes, header_warnings, modality_warnings

CPU_BATCH = 8  # m4oe-t on 2 cores, 512^2 CT: batch 8 was 3-6% faster than 16 and needed 2.0 GB, not 3.0


class PredictError(ValueError):
    """The request cannot be served by this model (unknown dataset or modality, missing statistics)."""


@dataclass
class Prediction:
    labels: np.ndarray  # [z, y, x] in canonical order, output label values
    class_names: list[str]  # classes that can appear, in output order
    label_values: list[int]  # their values in ``labels``
    expert_weights: dict[str, float] = field(default_factory=dict)  # mean gate weight per expert
    probabilities: np.ndarray | None = None  # [classes, z, y, x] float16, canonical order
    warnings: list[str] = field(default_factory=list)
    largest_only: list[str] = field(default_factory=list)  # classes cut to their largest connected component
    fov_edge_values: set[int] = field(default_factory=set)  # label values reaching the field of view's edge
    uncertainty: dict[str, np.ndarray] | None = None  # name -> [z, y, x] float32 map, canonical order


def cpu_threads() -> int:
    """Threads for CPU inference: ``OMP_NUM_THREADS`` when set, else the CPUs this process may run
    on (its affinity, as ``taskset`` or a container limit sets it), not every CPU of the machine."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_rotations(angles) -> tuple[float, ...]:
    """Test-time rotation angles in degrees, each in (0, 180]; raises :class:`PredictError` otherwise."""
    angles = tuple(float(a) for a in angles)
    bad = [a for a in angles if not 0 < a <= 180]
    if bad:
        raise PredictError(f"rotation angles must be in (0, 180] degrees (each is used as + and -), got {bad}")
    return angles


@dataclass
class PredictRequest:
    """A resolved request: the model's dataset and modality indices (``None``: the union vocabulary /
    the gate alone), the normalisation, the output classes (their indices in the model's vocabulary
    and their label values in the output), the dataset's in-plane flip and field of view, and the
    classes cut to their largest connected component."""

    dataset: int | None
    modality: int | None
    normalization: dict
    class_index: list[int]
    classes: list[str]
    values: list[int]
    flip: list[str]
    fov: float
    largest_only: list[str]

    @property
    def slices(self) -> SliceRequest:
        """What the slice engine needs of it."""
        return SliceRequest(self.modality, self.dataset)


class Predictor:
    """Segments volumes with a model bundle.

    Args:
        model: a model loaded with :func:`m4oe.load_bundle` (its ``bundle_extra`` holds the
            normalisation statistics and label values of every training dataset).
        device: ``cpu`` or ``cuda`` (default: cuda if available).
        batch_size: slices per forward pass (default: 16 on a GPU, 8 on a CPU, where larger batches
            were slower end to end and take more memory).
        tta: average the probabilities of the slice and its left-right mirror.
        rotations: angles in degrees; also average the probabilities of the slice rotated in-plane by
            plus and minus each angle (rotated back before averaging; with ``tta``, each rotation is
            mirrored too). ``(10, 20)`` gives five views.
        keep_largest: keep only the largest connected component of every class.
        postprocess: apply the bundle's post-processing for the request's dataset: keep the largest
            connected component of the classes where training's validation found that this raised
            Dice. Needs ``dataset``; ``keep_largest`` applies it to every class instead.
        routing: override the model's routing (``hard`` runs one expert per sample: faster).
        precision: ``fp32``, ``bf16`` (weights and activations) or ``auto``: bf16 on a GPU, fp32 on a
            CPU (on a CPU with bf16 matrix instructions, AVX512-BF16 or AMX, ``bf16`` runs the model
            about 3x faster). The model is moved and cast in place.
        orientation: ``auto``, ``dataset`` or ``header``: whether a dataset's in-plane flip is applied
            to an input (see :mod:`m4oe.infer.orientation`).
        strict: refuse an input whose intensities look unlike the training scans of the request
            (:mod:`m4oe.infer.intensity_check`) instead of warning.

    On the CPU it sets two process-wide things: PyTorch's thread count (all cores) and glibc's
    allocator thresholds (:func:`m4oe.memory.keep_freed_memory`).
    """

    def __init__(
        self,
        model: SegmentationModel,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        tta: bool = False,
        keep_largest: bool = False,
        routing: str | None = None,
        precision: str = "auto",
        postprocess: bool = True,
        rotations: tuple[float, ...] = (),
        engine: str = "torch",
        onnx: str | os.PathLike | None = None,
        orientation: str = "auto",
        strict: bool = False,
    ) -> None:
        check_segmentation_bundle(model, "--model")
        if orientation not in ORIENTATIONS:
            raise PredictError(f"--orientation {orientation!r}: use one of {', '.join(ORIENTATIONS)}")
        self.orientation, self.strict = orientation, strict
        if engine not in ENGINES:
            raise PredictError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
        if engine == "onnx":
            device, precision = _onnx_device(device, precision)
        self.device = resolve_device(device)
        # The whole model runs in bf16 (weights and activations), not under autocast: faster.
        self.dtype = inference_dtype(precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        if routing is not None:
            if routing not in ROUTING_MODES:
                raise PredictError(f"--routing {routing!r}: use one of {', '.join(ROUTING_MODES)}")
            self.model.set_routing(routing)
        if batch_size is None:
            batch_size = 16 if self.device.type == "cuda" else CPU_BATCH
        if batch_size < 1:
            raise PredictError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size, self.tta, self.keep_largest = batch_size, tta, keep_largest
        self.rotations = check_rotations(rotations)
        self.postprocess = postprocess
        self.engine = SliceEngine(self.model, self.device, batch_size, self.dtype, tta=tta, rotations=self.rotations)
        self.engine_name, self.onnx_path = engine, onnx
        self._onnx_engines: dict[tuple, SliceEngine] = {}
        info = BundleInfo.of(model)
        self.datasets, self.largest_only = info.datasets, info.keep_largest
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())
            keep_freed_memory()  # process-wide, like the thread count: activations are reused, not faulted in

    def resolve(self, dataset: str | None, modality: str | None) -> PredictRequest:
        """What serving ``--dataset`` / ``--modality`` means for this model (see :class:`PredictRequest`);
        raises :class:`PredictError` for a request it cannot serve."""
        model = self.model
        if dataset is not None and dataset not in model.dataset_names:
            raise PredictError(f"unknown dataset {dataset!r}; this model knows {model.dataset_names}")
        if modality is not None and modality not in model.modalities:
            raise PredictError(f"unknown modality {modality!r}; this model's experts are {model.modalities}")
        if dataset is None and modality is not None:
            same = [name for name, info in self.datasets.items() if info.modality == modality]
            stats_source = same[0] if same else None
        else:
            stats_source = dataset
        if stats_source is None:
            schemes = {repr(info.normalization) for info in self.datasets.values()}
            if len(self.datasets) != 1 and len(schemes) != 1:
                raise PredictError(
                    f"give --dataset or --modality: the model's datasets {list(self.datasets)} are normalised "
                    "differently"
                )
            stats_source = next(iter(self.datasets), None)
        if stats_source not in self.datasets:
            raise PredictError("the bundle holds no normalisation statistics (train it with 'm4oe train')")
        info = self.datasets[stats_source]
        cfg = model.config
        if modality is None and (cfg.routing == "hard" or cfg.gate_modality or cfg.closed_experts):
            modality = info.modality  # these models need each sample's modality; a plain gate decides alone
        if dataset is None:
            classes = list(model.class_names)
            values = list(range(len(classes)))
        else:
            classes = list(model.label_sets[dataset])
            label_values = self.datasets[dataset].label_values if dataset in self.datasets else {}
            values = [label_values.get(c, k) for k, c in enumerate(classes)]
        return PredictRequest(
            dataset=None if dataset is None else model.dataset_names.index(dataset),
            modality=None if modality is None else model.modalities.index(modality),
            normalization=info.normalization,
            class_index=[model.class_names.index(c) for c in classes],
            classes=classes,
            values=values,
            # a flip describes the files of a training dataset: applied when the request names it
            flip=list(info.flip) if dataset is not None else [],
            fov=self._fov(dataset, modality),
            largest_only=self._largest_only(dataset, classes),
        )

    def check_request(self, dataset: str | None, modality: str | None) -> PredictRequest:
        """Resolve a request and set up what serves it (an ONNX engine is exported and checked here),
        so that a request this predictor cannot serve fails before any file is read."""
        request = self.resolve(dataset, modality)
        self._engine_for(request, dataset)
        return request

    def _engine_for(self, request: PredictRequest, dataset: str | None) -> SliceEngine:
        """The slice engine of a request: PyTorch's, or (``engine="onnx"``) one whose model is an
        onnxruntime session of the request's export (``onnx``, or exported here once per request)."""
        if self.engine_name == "torch":
            return self.engine
        from .onnx import OnnxModel, OnnxSession, export_onnx, weights_digest

        modality = None if request.modality is None else self.model.modalities[request.modality]
        key = (dataset, modality)
        if key not in self._onnx_engines:
            path = self.onnx_path
            if path is None:
                import tempfile

                path = Path(tempfile.mkdtemp(prefix="m4oe-onnx-")) / "model.onnx"
                export_onnx(self.model, path, dataset, modality)
            stand_in = OnnxModel(OnnxSession(path), self.model)
            stand_in.check(dataset, modality, self.model.config.routing, weights_digest(self.model))
            self._onnx_engines[key] = SliceEngine(stand_in, self.device, self.batch_size, torch.float32, tta=self.tta,
                                                  rotations=self.rotations)  # fmt: skip
        return self._onnx_engines[key]

    def _fov(self, dataset: str | None, modality: str | None) -> float:
        """The part of each slice the model sees: the dataset's ``fov``; without a dataset, the one that
        all datasets of the modality (or of the model) share, else the whole slice (nothing is cut)."""
        if dataset is not None:
            return self.datasets[dataset].fov if dataset in self.datasets else 1.0
        views = {info.fov for info in self.datasets.values() if modality is None or info.modality == modality}
        return views.pop() if len(views) == 1 else 1.0

    def _largest_only(self, dataset: str | None, classes: list[str]) -> list[str]:
        """The request's classes to cut to their largest connected component."""
        if self.keep_largest:
            return classes[1:]
        if not self.postprocess or dataset is None:
            return []
        return [c for c in classes if c in self.largest_only.get(dataset, ())]

    def _plan(self, volume: Volume, fov: float) -> SlicePlan:
        """How the volume's slices are fitted to the model input (as in training)."""
        return SlicePlan.fit(volume.array.shape[1:], volume.spacing_zyx[1:], self.model.config.img_size, fov)

    def _flip_for(self, volume: Volume, request: PredictRequest, engine: SliceEngine, name: str):
        """The in-plane flip for this input (see :mod:`m4oe.infer.orientation`) and a note when it is
        not the dataset's."""
        if not request.flip or self.orientation == "dataset":
            return request.flip, []
        if self.orientation == "header":
            return [], []
        plan = self._plan(volume, request.fov)
        probe = normalize(volume.array, request.normalization)[probe_indices(volume.array.shape[0])]
        confidence = []
        for flip in (request.flip, []):
            slices = fit_slices(flip_in_plane(probe, flip), plan)
            parts = [p.scores[:, request.class_index] for p in engine.batches(slices, request.slices)]
            scores = torch.cat(parts)
            confidence.append(foreground_confidence(scores if engine.averaged else scores.softmax(1)))
        if confidence[1] > confidence[0]:
            return [], [flip_note(name, request.flip, *confidence)]
        return request.flip, []

    def prepare(
        self, volume: Volume, normalization: dict, flip: list[str] | None = None, fov: float = 1.0
    ) -> tuple[torch.Tensor, SlicePlan]:
        """The model input of a volume, ``[Z, size, size]`` on the host, and the plan to map results back
        (``flip``: the in-plane axes the request's dataset reverses, see ``DatasetConfig.flip``;
        ``fov``: the central fraction of each side the model sees, see ``DatasetConfig.fov``)."""
        plan = self._plan(volume, fov)
        return fit_slices(normalize(flip_in_plane(volume.array, flip or []), normalization), plan), plan

    @torch.no_grad()
    def predict_volume(
        self, volume: Volume, dataset: str | None = None, modality: str | None = None, probabilities: bool = False,
        uncertainty: bool = False,
    ) -> Prediction:  # fmt: skip
        """Segment ``volume`` for the request; with ``probabilities`` keep the softmax, with
        ``uncertainty`` the maps of :mod:`m4oe.infer.uncertainty`."""
        from .uncertainty import UncertaintyMaps, expert_views, has_expert_views

        request = self.resolve(dataset, modality)
        name = dataset or (self.model.modalities[request.modality] if request.modality is not None else "the model")
        array, notes = physical_input(volume.array, request.normalization, name)
        problems = intensity_warnings(array, request.normalization, name)
        if problems and self.strict:
            raise PredictError(f"{problems[0]} (refused: --strict)")
        volume = replace(volume, array=array) if array is not volume.array else volume
        engine = self._engine_for(request, dataset)
        flip, orientation_notes = self._flip_for(volume, request, engine, name)
        request = replace(request, flip=flip)
        slices, plan = self.prepare(volume, request.normalization, request.flip, request.fov)
        class_index = torch.tensor(request.class_index, device=self.device)
        few = len(class_index) <= 256  # class indices in one byte: a 100 x 512^2 map is 26 MB, not 210
        index_dtype = torch.uint8 if few else torch.int16
        labels = np.zeros(volume.array.shape, dtype=np.uint8 if few else np.int16)
        probs_out = np.zeros((len(class_index), *volume.array.shape), np.float16) if probabilities else None
        gate_sum, gate_count = None, 0
        averaged = engine.averaged  # probabilities averaged over views, not logits
        with_views = uncertainty and engine is self.engine and has_expert_views(self.model)
        maps = UncertaintyMaps(volume.array.shape, with_views) if uncertainty else None
        views = expert_views(self.model, engine, slices, request.slices) if with_views else None
        for part in engine.batches(slices, request.slices):
            start, b = part.start, part.size
            if part.gate_sums is not None:
                means = part.gate_sums.mean(0)  # [E]: the mean over blocks
                gate_sum = means if gate_sum is None else gate_sum + means
                gate_count += b
            scores = unfit_logits(part.scores[:, class_index], plan, probabilities=averaged)  # [b, C, Y, X]
            labels[start : start + b] = class_argmax(scores, index_dtype).cpu().numpy()
            if probs_out is not None or maps is not None:
                p = scores if averaged else scores.softmax(1)
            if probs_out is not None:
                # torch's copy converts and transposes in one pass (numpy's astype of the strided view: 60x slower)
                torch.from_numpy(probs_out)[:, start : start + b] = p.permute(1, 0, 2, 3).cpu()
            if maps is not None:
                others = [unfit_logits(v.scores[:, class_index], plan, probabilities=averaged) for v in next(views)] \
                    if views is not None else []  # fmt: skip
                maps.add(start, p, [o if averaged else o.softmax(1) for o in others])
        edges = edge_warnings(labels, plan, request.fov)  # in the plan's (flipped) orientation
        at_edge = {request.values[int(i)] for i in fov_edge_classes(labels, plan) if i}
        labels = flip_in_plane(labels, request.flip)  # back to the file's own orientation
        if probs_out is not None:
            probs_out = flip_in_plane(probs_out, request.flip)
        largest_only = request.largest_only
        if largest_only:
            labels = keep_largest_components(labels, [request.classes.index(c) for c in largest_only])
        values = np.asarray(request.values, dtype=np.uint8 if max(request.values) < 256 else np.int32)
        experts = {}
        if gate_sum is not None:
            weights = (gate_sum / gate_count).tolist()
            experts = {m: round(w, 4) for m, w in zip(self.model.modalities, weights, strict=True)}
        warnings = problems + notes + orientation_notes
        warnings += modality_warnings(volume, request.normalization, self.model.modalities) + edges
        warnings += header_warnings(volume)
        return Prediction(
            values[labels],
            request.classes,
            request.values,
            experts,
            probs_out,
            warnings,
            largest_only,
            at_edge,
            None if maps is None else {k: flip_in_plane(v, request.flip) for k, v in maps.maps.items()},
        )


ENGINES = ("torch", "onnx")


def _onnx_device(device, precision: str) -> tuple[str, str]:
    """onnxruntime runs here on the CPU in fp32: refuse anything else."""
    if device is not None and str(device) != "cpu":
        raise PredictError(f"--engine onnx runs on the CPU (onnxruntime's CPU provider), not --device {device}")
    if precision == "bf16":
        raise PredictError("--engine onnx runs in fp32; leave out --precision bf16")
    return "cpu", "fp32"


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a :class:`Predictor` runs in for ``precision`` (see there) on ``device``."""
    if precision not in PRECISIONS:
        raise PredictError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if uses_bf16(precision, device) else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (without it, bf16 is slower than fp32)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
