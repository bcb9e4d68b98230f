"""Ensembles: the mean softmax of several bundles (folds, seeds), at prediction time
(``m4oe predict -m A -m B``) or later from saved probabilities (``m4oe ensemble DIR1 DIR2 -o OUT``).

Both paths combine the same numbers in the same way (:func:`combine`): each member's probabilities as
``predict --probabilities`` stores them (float16, after its own test-time augmentation), their mean in
float32, the first class of highest mean probability, and the largest connected component kept only
for the classes where every member's validation chose it. So an ensemble of saved probabilities gives
the label maps that predicting with the members at once gives (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.io import Geometry, Volume
from ..data.postprocess import keep_largest_components
from .predict import PredictError, Prediction, Predictor, PredictRequest


@dataclass
class Combined:
    index: np.ndarray  # class index per voxel, after the post-processing the members agree on
    probabilities: np.ndarray  # [C, ...] float16: the members' mean
    largest_only: list[str]  # the classes cut to their largest component: those every member chose


def combine(members: list[np.ndarray], classes: list[str], largest_only: list[list[str]]) -> Combined:
    """The ensemble of ``members`` (each ``[C, ...]`` probabilities over ``classes``): mean, argmax,
    then the largest component of the classes in every member's ``largest_only``."""
    mean = np.zeros(members[0].shape, np.float32)
    for probabilities in members:
        mean += probabilities.astype(np.float32)
    mean /= len(members)
    index = mean.argmax(0).astype(np.uint8 if len(classes) <= 256 else np.int16)
    agreed = agreed_largest(classes, largest_only)
    if agreed:
        index = keep_largest_components(index, [classes.index(c) for c in agreed])
    return Combined(index, mean.astype(np.float16), agreed)


def agreed_largest(classes: list[str], largest_only: list[list[str]]) -> list[str]:
    """The classes every member cuts to their largest connected component, in ``classes``' order."""
    return [c for c in classes if all(c in chosen for chosen in largest_only)]


class EnsemblePredictor:
    """Segments volumes with several bundles at once; used by :func:`m4oe.infer.files.predict_paths`
    as a :class:`~m4oe.infer.predict.Predictor` is.

    Every member must serve the request with the same classes and label values; each runs its own
    normalisation, flip, field of view and test-time augmentation, and brings its probabilities back
    to the volume's grid before they are averaged.
    """

    def __init__(self, members: list[Predictor]) -> None:
        if len(members) < 2:
            raise PredictError("an ensemble needs at least two models (-m A -m B)")
        self.members = members
        self.device = members[0].device

    def resolve(self, dataset: str | None, modality: str | None) -> PredictRequest:
        requests = [member.resolve(dataset, modality) for member in self.members]
        first = requests[0]
        for k, request in enumerate(requests[1:], start=2):
            if (request.classes, request.values) != (first.classes, first.values):
                mine = dict(zip(first.classes, first.values, strict=True))
                theirs = dict(zip(request.classes, request.values, strict=True))
                differ = sorted(set(mine.items()) ^ set(theirs.items()))
                raise PredictError(
                    f"-m (model {k}) cannot be ensembled with the first: its label set for "
                    f"{dataset or 'the union vocabulary'} differs ({differ[:4]}); ensemble models of the same label set"
                )
        return first

    def check_request(self, dataset: str | None, modality: str | None) -> PredictRequest:
        for member in self.members:
            member.check_request(dataset, modality)
        return self.resolve(dataset, modality)

    def predict_volume(self, volume: Volume, dataset: str | None = None, modality: str | None = None,
                       probabilities: bool = False, uncertainty: bool = False) -> Prediction:  # fmt: skip
        from .uncertainty import ensemble_maps

        request = self.resolve(dataset, modality)
        results = [member.predict_volume(volume, dataset, modality, probabilities=True) for member in self.members]
        combined = combine([r.probabilities for r in results], request.classes, [r.largest_only for r in results])
        values = np.asarray(request.values, dtype=np.uint8 if max(request.values) < 256 else np.int32)
        experts = _mean_weights([r.expert_weights for r in results])
        warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
        return Prediction(
            values[combined.index], request.classes, request.values, experts,
            combined.probabilities if probabilities else None, warnings, combined.largest_only,
            set().union(*(r.fov_edge_values for r in results)),
            ensemble_maps([r.probabilities for r in results]) if uncertainty else None,
        )  # fmt: skip


def _mean_weights(weights: list[dict[str, float]]) -> dict[str, float]:
    shared = set.intersection(*(set(w) for w in weights)) if weights else set()
    return {m: round(sum(w[m] for w in weights) / len(weights), 4) for m in weights[0] if m in shared}


def ensemble_folders(folders: list[Path], out: Path, probabilities: bool = False) -> list[Path]:
    """``m4oe ensemble``: the label maps of the mean of saved probabilities (``CASE_probabilities.npz``
    of ``predict --probabilities``), case by case; the cases are those every folder holds."""
    from ..data.io import write_volume
    from ..files import check_output_dir, mark_output_dir
    from .files import label_map_target, save_probabilities

    if len(folders) < 2:
        raise PredictError("give at least two folders of probabilities to ensemble")
    cases = _shared_cases(folders)
    check_output_dir(out, "predictions", folders)
    for case in cases:  # every check before anything is written
        _check_members([np.load(Path(f) / f"{case}_probabilities.npz") for f in folders], case, folders)
    mark_output_dir(out, "predictions")
    written = []
    for case in cases:
        members = [np.load(Path(f) / f"{case}_probabilities.npz") for f in folders]
        first = members[0]
        classes = [str(c) for c in first["classes"]]
        largest = [[str(c) for c in m["largest_only"]] if "largest_only" in m else [] for m in members]
        combined = combine([m["probabilities"] for m in members], classes, largest)
        values = np.asarray(first["label_values"])
        geometry = Geometry(tuple(first["spacing"]), tuple(first["origin"]), tuple(first["direction"]))
        labels = values.astype(np.uint8 if values.max() < 256 else np.uint16)[combined.index]
        # the labels are in the files' voxel order already: written as they are, on the members' grid
        written.append(write_volume(labels, geometry, label_map_target(out / f"{case}.nii.gz", geometry)))
        if probabilities:
            save_probabilities(out / f"{case}_probabilities.npz", combined.probabilities, classes,
                               [int(v) for v in values], geometry, combined.largest_only)  # fmt: skip
    return written


def _shared_cases(folders: list[Path]) -> list[str]:
    sets = []
    for folder in folders:
        names = {p.name.removesuffix("_probabilities.npz") for p in Path(folder).glob("*_probabilities.npz")}
        if not names:
            raise PredictError(f"{folder}: no CASE_probabilities.npz (write them with predict --probabilities)")
        sets.append(names)
    shared = sorted(set.intersection(*sets))
    if not shared:
        raise PredictError(f"the folders {[str(f) for f in folders]} share no case")
    return shared


def _check_members(members, case: str, folders: list[Path]) -> None:
    first = members[0]
    for folder, member in zip(folders[1:], members[1:], strict=True):
        for key in ("classes", "label_values"):
            if not np.array_equal(member[key], first[key]):
                raise PredictError(f"{folder}/{case}_probabilities.npz: its {key} differ from {folders[0]}'s; "
                                   "ensemble predictions of the same label set")  # fmt: skip
        if member["probabilities"].shape != first["probabilities"].shape:
            raise PredictError(f"{folder}/{case}_probabilities.npz: shape {member['probabilities'].shape} differs "
                               f"from {folders[0]}'s {first['probabilities'].shape}: not the same scan")  # fmt: skip
        mine, theirs = Geometry.from_dict({k: first[k] for k in ("spacing", "origin", "direction")}), \
            Geometry.from_dict({k: member[k] for k in ("spacing", "origin", "direction")})  # fmt: skip
        problem = mine.mismatch(theirs)
        if problem:
            raise PredictError(f"{folder}/{case}_probabilities.npz: another grid than {folders[0]}'s ({problem})")
