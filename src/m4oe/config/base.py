"""What every config module shares: the error type and the checks of field kinds and keys."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def check_field_types(config: Any, prefix: str) -> None:
    """Every plain field of a config dataclass holds a value of its declared kind: whole numbers for
    ``int`` fields (``64.0`` and ``"64"`` are refused), finite numbers for ``float`` ones, true/false
    for ``bool`` ones, text for ``str`` ones, lists of whole numbers for ``tuple[int, ...]`` ones."""
    import math

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {
        "int": (whole, "a whole number"),
        "float": (lambda v: (whole(v) or isinstance(v, float)) and math.isfinite(v), "a finite number"),
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "str": (lambda v: isinstance(v, str), "text"),
        "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(map(whole, v)), "a list of whole numbers"),
        "int | None": (lambda v: v is None or whole(v), "a whole number"),
        "float | None": (
            lambda v: v is None or ((whole(v) or isinstance(v, float)) and math.isfinite(v)),
            "a finite number",
        ),
        "str | None": (lambda v: v is None or isinstance(v, str), "text"),
    }
    for f in dataclasses.fields(config):
        if f.type in checks:
            fits, kind = checks[f.type]
            value = getattr(config, f.name)
            if not fits(value):
                raise ConfigError(f"{prefix}{f.name} must be {kind}, got {type(value).__name__} {value!r}")


def reject_unknown(values: dict, known: set[str], where: str) -> None:
    """The one check of unknown keys: names them and lists the allowed ones."""
    extra = sorted(set(values) - set(known))
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra}; allowed: {sorted(known)}")


def from_mapping(cls, values: dict[str, Any], where: str):
    """``cls(**values)`` for a config dataclass, unknown keys refused naming ``where``."""
    reject_unknown(values, field_names(cls), where)
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"bad {where} config: {err}") from err


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
