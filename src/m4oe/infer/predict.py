"""``m4oe predict``: volumes in, label maps out with the input's exact geometry.

Each volume is reoriented to the canonical axis order, normalised with the bundle's statistics of
the chosen dataset, sliced and fitted to the model input as in training, predicted in batches (bf16
on GPU), the logits (or the probabilities averaged over test-time views: mirrored, rotated) are
resampled back to the original slice grid before the argmax, and the label map is written in the
file's own orientation, spacing, origin and direction, with the chosen dataset's label numbers (or
union-vocabulary indices).
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle import check_segmentation_bundle
from ..config import ROUTING_MODES
from ..data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    Volume,
    check_file,
    flip_in_plane,
    negative_voxel_sizes,
    read_volume,
    write_like_nifti,
    write_volume,
)
from ..data.loader import stack_slice_context
from ..data.normalize import normalize
from ..data.postprocess import keep_largest_components
from ..data.resample import SlicePlan, fit_slices, unfit_logits
from ..devices import resolve_device
from ..files import OutputError, atomic_write, check_output_dir, dataset_root, mark_output_dir
from ..memory import keep_freed_memory
from ..model.base import SegmentationModel
from ..model.head import class_argmax

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


def mirror_permutation(class_names: list[str]) -> list[int]:
    """Class order of a left-right mirrored prediction: each class whose name differs from another's
    only by ``left`` / ``right`` takes its partner's place (``left_kidney`` <-> ``right_kidney``)."""
    index = {name: k for k, name in enumerate(class_names)}
    order = []
    for name in class_names:
        swapped = re.sub(r"left|right", lambda m: "right" if m.group(0) == "left" else "left", name)
        order.append(index.get(swapped, index[name]))
    return order


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


def rotate_slices(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """``[B, C, H, W]`` rotated in-plane about the centre by ``degrees`` (counter-clockwise as an image
    is shown, row 0 at the top), bilinear, edge values repeated outside; computed in float32."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)


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
        precision: ``fp32``, ``bf16`` (weights and activations) or ``auto``: bf16 on a GPU and on a
            CPU with bf16 matrix instructions (AVX512-BF16 or AMX; the model runs about 3x faster
            than in fp32 there), fp32 elsewhere. The model is moved and cast in place.

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
    ) -> None:
        check_segmentation_bundle(model, "--model")
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
        self.mirror_classes = torch.tensor(mirror_permutation(model.class_names), device=self.device)
        self.datasets = getattr(model, "bundle_extra", {}).get("datasets", {})
        self.largest_only = getattr(model, "bundle_extra", {}).get("postprocessing", {}).get("keep_largest", {})
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())
            keep_freed_memory()  # process-wide, like the thread count: activations are reused, not faulted in

    def resolve(self, dataset: str | None, modality: str | None) -> dict:
        """Dataset index, modality index, normalisation and output classes of a request."""
        model = self.model
        if dataset is not None and dataset not in model.dataset_names:
            raise PredictError(f"unknown dataset {dataset!r}; this model knows {model.dataset_names}")
        if modality is not None and modality not in model.modalities:
            raise PredictError(f"unknown modality {modality!r}; this model's experts are {model.modalities}")
        if dataset is None and modality is not None:
            same = [name for name, info in self.datasets.items() if info.get("modality") == modality]
            stats_source = same[0] if same else None
        else:
            stats_source = dataset
        if stats_source is None:
            schemes = {repr(info["normalization"]) for info in self.datasets.values()}
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
            modality = info["modality"]  # these models need each sample's modality; a plain gate decides alone
        if dataset is None:
            classes = list(model.class_names)
            values = list(range(len(classes)))
        else:
            classes = list(model.label_sets[dataset])
            label_values = self.datasets.get(dataset, {}).get("label_values") or {}
            values = [label_values.get(c, k) for k, c in enumerate(classes)]
        return {
            "dataset": None if dataset is None else model.dataset_names.index(dataset),
            "modality": None if modality is None else model.modalities.index(modality),
            "normalization": info["normalization"],
            "class_index": [model.class_names.index(c) for c in classes],
            "classes": classes,
            "values": values,
            # a flip describes the files of a training dataset: applied when the request names it
            "flip": list(info.get("flip", [])) if dataset is not None else [],
            "fov": self._fov(dataset, modality),
            "largest_only": self._largest_only(dataset, classes),
        }

    def _fov(self, dataset: str | None, modality: str | None) -> float:
        """The part of each slice the model sees: the dataset's ``fov``; without a dataset, the one that
        all datasets of the modality (or of the model) share, else the whole slice (nothing is cut)."""
        if dataset is not None:
            return float(self.datasets.get(dataset, {}).get("fov", 1.0))
        views = {float(info.get("fov", 1.0)) for info in self.datasets.values()
                 if modality is None or info.get("modality") == modality}  # fmt: skip
        return views.pop() if len(views) == 1 else 1.0

    def _largest_only(self, dataset: str | None, classes: list[str]) -> list[str]:
        """The request's classes to cut to their largest connected component."""
        if self.keep_largest:
            return classes[1:]
        if not self.postprocess or dataset is None:
            return []
        return [c for c in classes if c in self.largest_only.get(dataset, ())]

    def prepare(
        self, volume: Volume, normalization: dict, flip: list[str] | None = None, fov: float = 1.0
    ) -> tuple[torch.Tensor, SlicePlan]:
        """The model input of a volume, ``[Z, size, size]`` on the host, and the plan to map results back
        (``flip``: the in-plane axes the request's dataset reverses, see ``DatasetConfig.flip``;
        ``fov``: the central fraction of each side the model sees, see ``DatasetConfig.fov``)."""
        plan = SlicePlan.fit(volume.array.shape[1:], volume.spacing_zyx[1:], self.model.config.img_size, fov)
        return fit_slices(normalize(flip_in_plane(volume.array, flip or []), normalization), plan), plan

    def model_input(self, slices: torch.Tensor, start: int) -> torch.Tensor:
        """The batch of prepared slices from ``start``: ``[b, 1 + 2k, size, size]``, each slice with the
        model's ``slice_context`` neighbours on either side."""
        return stack_slice_context(slices, self.model.config.slice_context, start, start + self.batch_size)

    def average_views(self, batch: torch.Tensor, logits: torch.Tensor, modality, dataset) -> torch.Tensor:
        """Mean softmax over the test-time views of ``batch`` (``logits``: the plain view's), each
        mapped back onto the slice: rotations by plus and minus each angle, and with ``tta`` the
        left-right mirror of every view."""
        total, count = logits.float().softmax(1), 1
        for angle in (0.0, *(sign * a for a in self.rotations for sign in (1, -1))):
            view = rotate_slices(batch, angle) if angle else batch
            if angle:
                total = total + rotate_slices(self.model(view, modality, dataset).float().softmax(1), -angle)
                count += 1
            if self.tta:
                flipped = self.model(view.flip(-1), modality, dataset)
                # in the mirrored slice the right kidney lies where the left one belongs, and the model
                # (trained without flips) calls it left: swap the paired classes back when un-mirroring
                mirrored = flipped.float().flip(-1).softmax(1)[:, self.mirror_classes]
                total = total + (rotate_slices(mirrored, -angle) if angle else mirrored)
                count += 1
        return total / count

    @torch.no_grad()
    def predict_volume(
        self, volume: Volume, dataset: str | None = None, modality: str | None = None, probabilities: bool = False
    ) -> Prediction:
        request = self.resolve(dataset, modality)
        slices, plan = self.prepare(volume, request["normalization"], request["flip"], request["fov"])
        class_index = torch.tensor(request["class_index"], device=self.device)
        Z = slices.shape[0]
        few = len(class_index) <= 256  # class indices in one byte: a 100 x 512^2 map is 26 MB, not 210
        index_dtype = torch.uint8 if few else torch.int16
        labels = np.zeros(volume.array.shape, dtype=np.uint8 if few else np.int16)
        probs_out = np.zeros((len(class_index), *volume.array.shape), np.float16) if probabilities else None
        gate_sum, gate_count = None, 0
        modality = request["modality"]  # one int for the whole batch: fast hard routing
        averaged = self.tta or bool(self.rotations)  # probabilities averaged over views, not logits
        for start in range(0, Z, self.batch_size):
            batch = self.model_input(slices, start).to(self.device, self.dtype)
            b = batch.shape[0]
            dataset = None
            if request["dataset"] is not None:
                dataset = torch.full((b,), request["dataset"], dtype=torch.long, device=self.device)
            logits, gates = self.model(batch, modality, dataset, return_gates=True)
            scores = self.average_views(batch, logits, modality, dataset) if averaged else logits.float()
            if gates:
                means = torch.stack([g.float().mean(dim=1).sum(0) for g in gates]).mean(0)  # [E]
                gate_sum = means if gate_sum is None else gate_sum + means
                gate_count += b
            scores = unfit_logits(scores[:, class_index], plan, probabilities=averaged)  # [b, C, Y, X]
            labels[start : start + b] = class_argmax(scores, index_dtype).cpu().numpy()
            if probs_out is not None:
                p = scores if averaged else scores.softmax(1)
                probs_out[:, start : start + b] = p.permute(1, 0, 2, 3).cpu().numpy().astype(np.float16)
        edges = edge_warnings(labels, plan, request["fov"])  # in the plan's (flipped) orientation
        labels = flip_in_plane(labels, request["flip"])  # back to the file's own orientation
        if probs_out is not None:
            probs_out = flip_in_plane(probs_out, request["flip"])
        largest_only = request["largest_only"]
        if largest_only:
            labels = keep_largest_components(labels, [request["classes"].index(c) for c in largest_only])
        values = np.asarray(request["values"], dtype=np.uint8 if max(request["values"]) < 256 else np.int32)
        experts = {}
        if gate_sum is not None:
            weights = (gate_sum / gate_count).tolist()
            experts = {m: round(w, 4) for m, w in zip(self.model.modalities, weights, strict=True)}
        warnings = modality_warnings(volume, request["normalization"], self.model.modalities) + edges
        warnings += header_warnings(volume)
        return Prediction(
            values[labels], request["classes"], request["values"], experts, probs_out, warnings, largest_only
        )


def modality_warnings(volume: Volume, normalization: dict, modalities: list[str]) -> list[str]:
    """A CT (Hounsfield units: much of the volume near -1000, air) given to a model whose
    normalisation for this request is MRI-style gives labels that mean nothing: say so."""
    if normalization.get("scheme") != "mri":
        return []
    sample = volume.array[:: max(1, volume.array.shape[0] // 8)]
    if float(np.percentile(sample, 5)) < -500:
        return [
            f"this looks like a CT (5th intensity percentile below -500, as air in Hounsfield units) but is "
            f"normalised as MRI; this model's experts are {modalities}: check --dataset / --modality"
        ]
    return []


def header_warnings(volume: Volume) -> list[str]:
    """A NIfTI whose header gives a negative voxel size is oriented one way by ITK and another by
    nibabel-based tools: say so (its label map copies its header, so each tool shows both alike)."""
    sizes = negative_voxel_sizes(volume.source) if volume.source is not None else None
    if sizes is None:
        return []
    return [
        f"its header gives a negative voxel size (pixdim[1:4] = {sizes}), which ITK reads as a mirrored axis and "
        "nibabel as a positive size: tools disagree on its orientation. The label map copies its header, so each "
        "tool overlays it on the scan as it shows the scan; fix the scan's header to remove the ambiguity"
    ]


def edge_warnings(labels: np.ndarray, plan: SlicePlan, fov: float) -> list[str]:
    """A structure that reaches the edge of a cut-down field of view may go on beyond it: say so."""
    if plan.crop is None:
        return []
    top, bottom, left, right = plan.crop
    edges = [labels[:, top], labels[:, bottom - 1], labels[:, top:bottom, left], labels[:, top:bottom, right - 1]]
    touching = sum(int(np.count_nonzero(e)) for e in edges)
    if not touching:
        return []
    return [
        f"{touching} labelled pixels touch the edge of the model's field of view (the central {fov:g} of each "
        "side, as in training): a structure there may extend beyond it and be cut"
    ]


PRECISIONS = ("auto", "fp32", "bf16")


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a :class:`Predictor` runs in for ``precision`` (see there) on ``device``."""
    if precision not in PRECISIONS:
        raise PredictError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (without it, bf16 is slower than fp32)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def output_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case.nii.gz`` (nnU-Net naming); a DICOM folder -> ``folder.nii.gz``."""
    if path.is_dir():
        return f"{path.name}.nii.gz"
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_\d{4}$", "", name) + ".nii.gz"


def collect_inputs(path: Path) -> list[Path]:
    """A file, a folder of image files, a DICOM series folder, or a folder of DICOM series folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1]))
    if files:
        return files
    if _has_dicom(path):
        return [path]
    series = sorted(p for p in path.iterdir() if p.is_dir() and _has_dicom(p))
    if not series:
        raise PredictError(f"{path}: no images (NIfTI, NRRD, MHA) or DICOM series found")
    return series


def _has_dicom(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    experts: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[tuple[Path, str]] = field(default_factory=list)


def predict_paths(
    predictor: Predictor,
    inputs: list[Path],
    out_dir: Path,
    dataset: str | None = None,
    modality: str | None = None,
    probabilities: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictReport:
    """Predict every input; a file that fails is reported and skipped, the others are written.

    ``out_dir`` must be new, empty or an earlier m4oe predictions folder; files already there are
    replaced only with ``overwrite`` (all of this is checked before any volume is read).

    Reading (and checking) the next volume and writing the previous result run on two background
    threads while the model predicts the current volume, so that a folder of scans is not bound by
    file I/O (on a GPU the model is the small part). At most one volume is read ahead and one result
    waits to be written, so memory stays that of about three volumes.
    """
    from tqdm.auto import tqdm

    predictor.resolve(dataset, modality)  # a bad request fails before any file is read
    out_dir = Path(out_dir)
    check_output_names(inputs, out_dir)
    check_existing_outputs(inputs, out_dir, probabilities, overwrite)
    mark_output_dir(out_dir, "predictions")
    outcomes: list[str | tuple[Future, dict]] = []  # per input: why it failed, or (its write, expert weights)
    report = PredictReport()
    with ThreadPoolExecutor(1, "m4oe-read") as reader, ThreadPoolExecutor(1, "m4oe-write") as writer:
        loading = reader.submit(_load, inputs[0]) if inputs else None
        writing = None
        for i, path in enumerate(tqdm(inputs, desc="predicting", unit="volume", disable=None if progress else True)):
            current, loading = loading, reader.submit(_load, inputs[i + 1]) if i + 1 < len(inputs) else None
            try:
                volume = current.result()
                result = predictor.predict_volume(volume, dataset, modality, probabilities)
            except PREDICT_FAILURES as err:
                outcomes.append(str(err))
                continue
            if writing is not None:
                wait([writing])  # one result waits behind the one being written, no more
            writing = writer.submit(_write, out_dir / output_name(path), volume, result)
            outcomes.append((writing, result.expert_weights))
            report.warnings += [(path, text) for text in result.warnings]
    for path, outcome in zip(inputs, outcomes, strict=True):
        if isinstance(outcome, str):
            report.failed.append((path, outcome))
            continue
        try:
            report.written.append(outcome[0].result())
            report.experts[str(path)] = outcome[1]
        except PREDICT_FAILURES as err:
            report.failed.append((path, str(err)))
    return report


def check_output_names(inputs: list[Path], out_dir: Path) -> None:
    """Refuse inputs whose label maps would overwrite each other (``case_0000.nii.gz``,
    ``case_0001.nii.gz`` and ``case.mha`` all give ``case.nii.gz``), and writing into a folder of
    inputs (the next run would read the label maps back in as images)."""
    targets: dict[str, list[Path]] = {}
    for path in inputs:
        targets.setdefault(output_name(path), []).append(path)
    clashes = {name: paths for name, paths in targets.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise PredictError(
            f"{len(clashes)} output name(s) would be written twice, e.g. {name} from "
            f"{', '.join(p.name for p in paths)}: predict these inputs into separate folders"
        )
    roots = {root for root in map(dataset_root, inputs) if root is not None}  # their nnU-Net dataset folders
    try:
        check_output_dir(out_dir, "predictions", [*inputs, *roots])
    except OutputError as err:
        raise PredictError(str(err)) from None


def output_files(path: Path, out_dir: Path, probabilities: bool) -> list[Path]:
    """Every file predicting ``path`` into ``out_dir`` may write (the label map as NIfTI or, for a
    sheared direction, MetaImage; the probabilities)."""
    name = output_name(path)
    files = [out_dir / name, out_dir / name.replace(".nii.gz", ".mha")]
    if probabilities:
        files.append(probabilities_path(out_dir / name))
    return files


def check_existing_outputs(inputs: list[Path], out_dir: Path, probabilities: bool, overwrite: bool) -> None:
    """Refuse to replace files a prediction would write over, unless ``overwrite``."""
    if overwrite:
        return
    existing = [f for p in inputs for f in output_files(p, Path(out_dir), probabilities) if f.exists()]
    if existing:
        raise PredictError(
            f"-o {out_dir}: {len(existing)} output file(s) exist already, e.g. {existing[0].name}: pass --overwrite "
            "to replace them, or choose another -o folder"
        )


def probabilities_path(label_path: Path) -> Path:
    """``case.nii.gz`` / ``case.mha`` -> ``case_probabilities.npz``."""
    name = label_path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else label_path.stem
    return label_path.with_name(f"{stem}_probabilities.npz")


PREDICT_FAILURES = (ImageReadError, ValueError, RuntimeError, OSError)  # reported per file; other errors stop


def _load(path: Path) -> Volume:
    if not path.is_file():  # a DICOM series folder: nothing for check_file to check
        return read_volume(path)
    with ThreadPoolExecutor(1, "m4oe-check") as pool:
        problems = pool.submit(check_file, path)  # nibabel's pass over the file, beside SimpleITK's
        try:
            volume, read_error = read_volume(path), None
        except PREDICT_FAILURES as err:
            volume, read_error = None, err
        if problems.result():  # its message is the more precise one (truncation, NaN)
            raise ImageReadError("; ".join(problems.result()))
    if read_error is not None:
        raise read_error
    return volume


def _write(target: Path, volume: Volume, result: Prediction) -> Path:
    if not volume.geometry.orthonormal():
        # NIfTI stores only rotations: ITK would write another direction. MetaImage keeps it exactly.
        target = target.with_name(target.name.replace(".nii.gz", ".mha"))
    dtype = np.uint8 if max(result.label_values) < 256 else np.uint16
    if target.name.endswith(".nii.gz") and volume.source is not None and negative_voxel_sizes(volume.source):
        labels = in_file_order(result.labels[None].astype(dtype), volume.geometry, volume.orientation)[0]
        write_like_nifti(labels, volume.source, target)  # ITK would write positive sizes and a mirrored direction
    else:
        write_volume(result.labels.astype(dtype), volume.geometry, target, volume.orientation)
    if result.probabilities is not None:
        geometry = volume.geometry
        _save_npz(
            probabilities_path(target),
            probabilities=in_file_order(result.probabilities, geometry, volume.orientation),
            classes=np.array(result.class_names),
            label_values=np.array(result.label_values),
            axes=np.array(PROBABILITY_AXES),
            spacing=np.array(geometry.spacing),
            origin=np.array(geometry.origin),
            direction=np.array(geometry.direction),
        )
    return target


# the layout of ``CASE_probabilities.npz``, as docs/prediction.md and the README describe it
PROBABILITY_AXES = "class, z, y, x: the voxel order of the label map file (SimpleITK's GetArrayFromImage)"


def in_file_order(probabilities: np.ndarray, geometry, orientation: str) -> np.ndarray:
    """``[class, z, y, x]`` probabilities from the canonical (LPS) order into the file's own voxel
    order, the order in which the label map written beside them is stored."""
    import SimpleITK as sitk

    from ..data.io import from_canonical

    def reorder(channel: np.ndarray) -> np.ndarray:
        wide = channel.astype(np.float32) if channel.dtype == np.float16 else channel  # ITK has no float16
        return sitk.GetArrayFromImage(from_canonical(wide, geometry, orientation)).astype(channel.dtype)

    return np.stack([reorder(p) for p in probabilities])


def _save_npz(path: Path, **arrays) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
