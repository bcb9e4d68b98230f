"""ONNX: a bundle exported for one request (dataset, modality, routing) as ``image -> logits``, checked
with onnxruntime against PyTorch, and an onnxruntime stand-in for the model in the slice engine, so
``predict --engine onnx`` runs the request's slices through onnxruntime and everything else (reading,
normalisation, test-time augmentation, resampling, post-processing, writing) as ``predict`` does.

Needs the ``onnx`` extra: ``pip install "m4oe[onnx]"`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..model.base import SegmentationModel
from .predict import PredictError

META_KEY = "m4oe"  # the ONNX metadata entry holding what the file was exported from, as JSON


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise PredictError(f'ONNX needs the onnx extra ({err.name} is missing): pip install "m4oe[onnx]"') from None


def weights_digest(model: SegmentationModel) -> str:
    """SHA-256 of the model's weights (names and values): binds an ONNX file to the bundle it came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Request(nn.Module):
    """The model serving one request: ``image [B, C, S, S] -> logits [B, K, S, S]``."""

    def __init__(self, model: SegmentationModel, dataset: int | None, modality: int | None) -> None:
        super().__init__()
        self.model, self.dataset, self.modality = model, dataset, modality

    def forward(self, image: Tensor) -> Tensor:
        dataset = None
        if self.dataset is not None:
            dataset = torch.full_like(image[:, 0, 0, 0], self.dataset, dtype=torch.long)
        return self.model(image, self.modality, dataset)


def export_onnx(model: SegmentationModel, path: str | Path, dataset: str | None = None, modality: str | None = None,
                routing: str | None = None, check_slices: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """Export ``model`` for the request ``dataset`` / ``modality`` (resolved as ``predict`` resolves it)
    to ``path`` (fp32, any batch size), and compare onnxruntime's logits with PyTorch's on
    ``check_slices`` (default: 4 random slices). With ``routing="hard"`` only the modality's expert is
    exported (the fast path). Returns the metadata written, the seconds, and the largest absolute
    logit difference."""
    from .predict import Predictor

    _require()
    import onnx

    predictor = Predictor(model, "cpu", precision="fp32", routing=routing)
    request = predictor.resolve(dataset, modality)
    model = predictor.model
    routing = model.config.routing
    if routing == "hard" and request.modality is None:
        raise PredictError("--routing hard: give --modality (or --dataset), the expert the ONNX file runs")
    wrapped = _Request(model, request.dataset, request.modality).eval()
    cfg = model.config
    example = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    started = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(wrapped, (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": {0: batch}}, dynamo=True, verbose=False)  # fmt: skip
    meta = {"weights_sha256": weights_digest(model), "dataset": dataset, "routing": routing,
            "modality": None if request.modality is None else model.modalities[request.modality],
            "img_size": cfg.img_size, "in_chans": cfg.in_chans, "class_names": list(model.class_names)}  # fmt: skip
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    seconds = time.perf_counter() - started
    slices = check_slices if check_slices is not None else torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size)
    return {"meta": meta, "seconds": seconds, "max_abs_diff": max_difference(wrapped, path, slices)}


def _index(names: list[str], name: str | None, what: str) -> int | None:
    if name is None:
        return None
    if name not in names:
        raise PredictError(f"unknown {what} {name!r}; this model knows {names}")
    return names.index(name)


def max_difference(request: nn.Module, path: Path, slices: Tensor) -> float:
    """Largest absolute difference between PyTorch's and onnxruntime's logits on ``slices``
    (classes outside the request's label set are ``-inf`` in both, and left out)."""
    with torch.no_grad():
        expected = request(slices.float()).numpy()
    found = OnnxSession(path).run(slices.float().numpy())
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(found)):
        return float("inf")
    return float(np.abs(expected[finite] - found[finite]).max(initial=0.0))


class OnnxSession:
    """An onnxruntime session of an exported file, with its metadata."""

    def __init__(self, path: str | Path) -> None:
        _require()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise PredictError(f"{path}: not an ONNX file exported by m4oe (no {META_KEY!r} metadata)")
        self.meta = json.loads(props[META_KEY])
        self.path = Path(path)

    def run(self, image: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})[0]


class OnnxModel:
    """Stands in for ``model`` in :class:`~m4oe.infer.engine.SliceEngine`: the same call, answered by
    onnxruntime, for the request the file was exported for (anything else is refused)."""

    def __init__(self, session: OnnxSession, model: SegmentationModel) -> None:
        self.session, self.config, self.class_names = session, model.config, list(model.class_names)

    def check(self, dataset: str | None, modality: str | None, routing: str, digest: str) -> None:
        """Refuse a file exported from other weights, or for another dataset, expert or routing."""
        meta, path = self.session.meta, self.session.path
        if meta["weights_sha256"] != digest:
            raise PredictError(f"--onnx {path}: exported from another model than -m (its weights differ); "
                               "export it from this bundle with m4oe export")  # fmt: skip
        wanted = {"dataset": dataset, "modality": modality, "routing": routing}
        for key, value in wanted.items():
            if meta[key] != value:
                raise PredictError(f"--onnx {path}: exported for {key} {meta[key]!r}, but this request has {value!r}; "
                                   "export one for this request")  # fmt: skip

    def __call__(self, image: Tensor, modality=None, dataset=None, return_gates: bool = False, routing=None):
        logits = torch.from_numpy(self.session.run(image.float().cpu().numpy()))
        return (logits, []) if return_gates else logits
