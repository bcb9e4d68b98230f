"""Configuration: the model and experiment schemas, the allowed words, YAML files (the bottom of the
import graph: it imports nothing else of m4oe)."""

from .base import ConfigError
from .choices import FLIP_AXES, NORMALIZATION_SCHEMES, ROUTING_MODES
from .experiment import (
    DatasetConfig,
    ExperimentConfig,
    SplitConfig,
    TrainConfig,
    experiment_to_dict,
    parse_experiment,
    window_pair,
)
from .model import PRESETS, ModelConfig, build_vocabulary, preset_config, register_preset
from .yaml_io import apply_overrides, load_experiment

__all__ = [
    "FLIP_AXES",
    "NORMALIZATION_SCHEMES",
    "PRESETS",
    "ROUTING_MODES",
    "ConfigError",
    "DatasetConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SplitConfig",
    "TrainConfig",
    "apply_overrides",
    "build_vocabulary",
    "experiment_to_dict",
    "load_experiment",
    "parse_experiment",
    "preset_config",
    "register_preset",
    "window_pair",
]
