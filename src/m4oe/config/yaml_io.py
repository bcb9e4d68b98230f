"""Experiment YAML files: reading (a key written twice is refused), with ``--set`` overrides."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .base import ConfigError
from .experiment import ExperimentConfig, parse_experiment

SECTIONS = ("model", "train", "split", "datasets")


def apply_overrides(values: Any, items: Iterable[str], option: str = "--set") -> Any:
    """The one override syntax of m4oe (the CLI and every script): ``SECTION.KEY=VALUE`` words over
    an experiment's YAML mapping, returned as a new mapping.

    ``SECTION`` is ``model``, ``train`` or ``split``; ``datasets.NAME.KEY`` sets a key of the
    dataset called ``NAME`` (its ``name``, else its folder's name), ``datasets.*.KEY`` of every
    dataset. ``VALUE`` is read as YAML: ``train.lr=0.01``, ``model.depths=[0,1,2,2,2]``,
    ``train.augment=false``, ``datasets.ACDC.fov=0.8``. Keys are checked when the result is parsed.
    """
    import copy

    import yaml

    values = copy.deepcopy(values) if isinstance(values, dict) else {}
    for item in items:
        key, sep, raw = item.partition("=")
        path = key.split(".")
        if not sep or not raw or len(path) < 2 or path[0] not in SECTIONS or not all(path):
            raise ConfigError(f"{option} {item!r}: give SECTION.KEY=VALUE with SECTION one of {SECTIONS}, "
                              "e.g. train.lr=0.01 or datasets.ACDC.fov=0.8")  # fmt: skip
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{option} {item!r}: the value is not valid YAML ({err.problem})") from None
        if path[0] == "datasets":
            if len(path) != 3:
                raise ConfigError(f"{option} {item!r}: give datasets.NAME.KEY=VALUE, e.g. datasets.ACDC.fov=0.8")
            entries = [d for d in values.get("datasets") or [] if isinstance(d, dict)]
            chosen = [d for d in entries if path[1] in ("*", _dataset_name(d))]
            if not chosen:
                names = [_dataset_name(d) for d in entries]
                raise ConfigError(f"{option} {item!r}: no dataset named {path[1]!r}; the config has {names}")
            for entry in chosen:
                entry[path[2]] = value
            continue
        section = values.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"{option} {item!r}: the config's {path[0]} is not a mapping")
        for part in path[1:-1]:  # split.val etc. are flat; nested keys only where the config nests them
            section = section.setdefault(part, {})
        section[path[-1]] = value
    return values


def _dataset_name(entry: dict) -> str:
    return str(entry.get("name") or Path(str(entry.get("path", ""))).name)


def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment YAML file, with ``--set`` words (:func:`apply_overrides`)
    applied first; errors name the file and the offending key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_experiment(apply_overrides(values, overrides), base_dir=path.parent, source=str(path))


class DuplicateKeyError(ValueError):
    """A YAML mapping names one key twice (YAML readers silently keep the last)."""


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key written twice in one mapping."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKeyError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one section; keep one"
                )
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader
