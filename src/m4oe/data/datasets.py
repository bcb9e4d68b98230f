"""Dataset discovery: nnU-Net v2 raw folders and MSD-style folders, turned into lists of cases.

Nothing is read beyond ``dataset.json`` and the folder listings here; problems found (missing files,
duplicate case ids, unsupported layouts) are collected, not raised one by one, so that the integrity
check can report every problem at once.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DatasetConfig, SplitConfig, window_pair


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent; the message lists every problem found."""

    def __init__(self, problems: list[str], header: str = "data problems") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)}):\n{lines}")


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path | None


@dataclass
class DatasetSource:
    """A dataset ready to be checked and cached: its cases and label vocabulary."""

    name: str
    root: Path
    modality: str
    normalization: str
    labeled: bool
    label_values: dict[str, int]  # names as in dataset.json -> label value in the files
    label_map: dict[str, str]
    weight: float
    split: SplitConfig
    cases: list[Case] = field(default_factory=list)
    flip: tuple[str, ...] = ()  # in-plane axes reversed after reorientation (a header that contradicts the anatomy)
    fov: float = 1.0  # central fraction of each in-plane side the model sees
    stored_window: tuple[float, float] | None = None  # the physical window the files store as 0..255

    @property
    def label_names(self) -> list[str]:
        """Label set after renaming/merging, background first, in label-value order."""
        names: list[str] = []
        for name, _ in sorted(self.label_values.items(), key=lambda item: item[1]):
            mapped = self.label_map.get(name, name)
            if mapped not in names:
                names.append(mapped)
        return names if self.labeled else ["background"]

    def value_to_name(self) -> dict[int, str]:
        return {value: self.label_map.get(name, name) for name, value in self.label_values.items()}


def _read_dataset_json(root: Path, problems: list[str]) -> dict | None:
    path = root / "dataset.json"
    if not root.is_dir():
        problems.append(f"{root}: dataset folder not found")
        return None
    if not path.is_file():
        problems.append(f"{path}: missing (every nnU-Net raw dataset has a dataset.json)")
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{path}: not valid JSON ({err})")
        return None
    if not isinstance(meta, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return meta


def _label_values(meta: dict, path: Path, problems: list[str]) -> dict[str, int]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{path}: 'labels' missing or empty")
        return {}
    if all(str(k).isdigit() for k in labels):  # MSD style: {"0": "background", "1": "liver"}
        values = {str(v): int(k) for k, v in labels.items()}
    else:  # nnU-Net v2: {"background": 0, "liver": 1}
        values = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                problems.append(f"{path}: label {name!r} is region-based ({value!r}); give each label one value")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(
                    f"{path}: label {name!r} has value {value!r}; label values must be whole numbers written "
                    f'without quotes or decimals, e.g. "{name}": 1'
                )
                continue
            values[name] = value
    if "ignore" in values:
        # nnU-Net v2 marks unannotated voxels with a label named "ignore"; m4oe would learn it as an organ
        problems.append(
            f"{path}: label 'ignore' (nnU-Net's marker of unannotated voxels) is not supported: m4oe would learn it "
            "as a class; annotate those voxels or leave the dataset out"
        )
        values.pop("ignore")
    by_value = {v: k for k, v in values.items()}
    if 0 not in by_value:
        problems.append(f"{path}: no label with value 0 (background)")
    elif by_value[0] != "background":
        values["background"] = values.pop(by_value[0])  # call value 0 'background' whatever its name
    if len(by_value) != len(values):
        problems.append(f"{path}: two labels share one value")
    return values


def _channel_name(meta: dict) -> str | None:
    channels = meta.get("channel_names") or meta.get("modality")
    if isinstance(channels, dict) and channels:
        if len(channels) > 1:
            return None
        return str(next(iter(channels.values())))
    return None


def _nnunet_cases(root: Path, ending: str, labeled: bool, problems: list[str]) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.append(f"{images_dir}: folder missing")
        return []
    cases: dict[str, Case] = {}
    for path in sorted(images_dir.iterdir()):
        if not path.name.endswith(ending) or path.name.startswith("."):
            continue
        stem = path.name[: -len(ending)]
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        if match is None:
            problems.append(f"{path}: image name must be CASE_0000{ending}")
            continue
        case_id, channel = match.group(1), match.group(2)
        if channel != "0000":
            problems.append(f"{path}: extra channel {channel}; only single-channel datasets are supported")
            continue
        if case_id in cases:
            problems.append(f"{path}: duplicate case id {case_id!r}")
            continue
        label = labels_dir / f"{case_id}{ending}" if labeled else None
        cases[case_id] = Case(case_id, path, label)
    if labeled:
        if not labels_dir.is_dir():
            problems.append(f"{labels_dir}: folder missing")
        else:
            for path in sorted(labels_dir.iterdir()):
                if path.name.endswith(ending) and path.name[: -len(ending)] not in cases:
                    problems.append(f"{path}: label without an image ({path.name[: -len(ending)]}_0000{ending})")
            for case in cases.values():
                if not case.label.is_file():
                    problems.append(f"{case.label}: label file missing for image {case.image.name}")
    return list(cases.values())


def _msd_cases(root: Path, entries: list, labeled: bool, problems: list[str]) -> list[Case]:
    cases: dict[str, Case] = {}
    for entry in entries:
        image = root / str(entry.get("image", "")) if isinstance(entry, dict) else None
        if image is None or not entry.get("image"):
            problems.append(f"{root / 'dataset.json'}: training entry without 'image': {entry!r}")
            continue
        name = image.name
        case_id = re.sub(r"(_0000)?\.(nii\.gz|nii|nrrd|mha|mhd)$", "", name)
        if case_id in cases:
            problems.append(f"{image}: duplicate case id {case_id!r} in the training list")
            continue
        label = root / str(entry["label"]) if labeled and entry.get("label") else None
        if not image.is_file():
            problems.append(f"{image}: image file missing")
        if labeled and (label is None or not label.is_file()):
            problems.append(f"{label or image}: label file missing for image {name}")
        cases[case_id] = Case(case_id, image, label)
    return list(cases.values())


def open_dataset(config: DatasetConfig, problems: list[str]) -> DatasetSource | None:
    """Discover the cases of one dataset; problems are appended to ``problems``."""
    root = Path(config.path)
    meta = _read_dataset_json(root, problems)
    if meta is None:
        return None
    json_path = root / "dataset.json"
    values = _label_values(meta, json_path, problems) if config.labeled else {"background": 0}
    modality = config.modality or _channel_name(meta)
    if modality is None:
        problems.append(f"{json_path}: cannot tell the modality (give 'modality' in the config)")
        return None
    if config.label_map:
        unknown = sorted(set(config.label_map) - set(values))
        if unknown:
            problems.append(f"{json_path}: label_map names labels {unknown} that dataset.json does not have")
    ending = meta.get("file_ending", ".nii.gz")
    if isinstance(meta.get("training"), list):  # MSD style lists its cases
        cases = _msd_cases(root, meta["training"], config.labeled, problems)
    else:
        cases = _nnunet_cases(root, ending, config.labeled, problems)
    if config.cases is not None:
        known = {c.case_id for c in cases}
        missing = [c for c in config.cases if c not in known]
        if missing:
            problems.append(f"{root}: cases {missing} named in the config are not in the dataset")
        cases = [c for c in cases if c.case_id in set(config.cases)]
    cases.sort(key=lambda c: c.case_id)
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    if not cases:
        problems.append(f"{root}: no cases found")
    normalization = config.normalization or ("ct" if "ct" in modality.lower() else "mri")
    return DatasetSource(
        name=config.name or root.name,
        root=root,
        modality=modality,
        normalization=normalization,
        labeled=config.labeled,
        label_values=values,
        label_map=dict(config.label_map or {}),
        weight=config.weight,
        split=config.split or SplitConfig(),
        cases=cases,
        flip=tuple(config.flip),
        fov=config.fov,
        stored_window=config.stored_window or _stored_window(meta, json_path, problems),
    )


def _stored_window(meta: dict, json_path: Path, problems: list[str]) -> tuple[float, float] | None:
    """dataset.json's ``stored_window`` (see ``DatasetConfig.stored_window``), if it gives one."""
    window = meta.get("stored_window")
    if window is None:
        return None
    pair = window_pair(window)
    if pair is None:
        problems.append(f"{json_path}: stored_window must be [low, high] in physical units, got {window!r}")
    return pair


def assign_folds(case_ids: list[str], split: SplitConfig, where: str) -> dict[str, int]:
    """Fold of every case; validation cases are those of fold ``split.fold``.

    Cases sharing a group (the first match of ``group_pattern`` in their id) share a fold. With an
    explicit ``val`` list, those cases get fold ``split.fold`` and all others ``-1`` (never validated).
    """
    if split.val is not None:
        unknown = sorted(set(split.val) - set(case_ids))
        if unknown:
            raise DataError([f"{where}: split.val names unknown cases {unknown}"], "bad split")
        return {c: (split.fold if c in split.val else -1) for c in case_ids}
    groups: dict[str, list[str]] = {}
    for case_id in case_ids:
        key = case_id
        if split.group_pattern:
            match = re.search(split.group_pattern, case_id)
            key = match.group(0) if match else case_id
        groups.setdefault(key, []).append(case_id)
    keys = sorted(groups)
    random.Random(split.seed).shuffle(keys)
    return {case_id: i % split.folds for i, key in enumerate(keys) for case_id in groups[key]}
