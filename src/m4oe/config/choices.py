"""Every set of allowed words, in one place: the config checks them, and the code that acts on them
(model, losses, loader, predict, bench) imports them from here."""

from __future__ import annotations

# model
ARCHITECTURES = ("swin", "convnext")
ROUTING_MODES = ("soft", "hard", "uniform")  # gate | own modality's expert | mean of experts
CONVNEXT_NORMS = ("layer", "instance")
CONVNEXT_INITS = ("trunc_normal", "kaiming")
CONVNEXT_SPATIAL = ("depthwise", "full")
ATTENTION_KERNELS = ("sdpa", "explicit")  # Swin window attention
HARD_KERNELS = ("grouped", "onehot", "auto")  # hard routing of mixed batches; auto: the device's default

# data
NORMALIZATION_SCHEMES = ("ct", "mri", "none")
FLIP_AXES = {"x": "right-left", "y": "anterior-posterior"}  # in-plane axes of a canonical (LPS) slice
STORAGE_TYPES = ("float16", "uint8")  # slice cache

# training
DICE_MODES = ("sample", "batch", "batch_present")
FOREGROUND_SAMPLING = ("any", "class")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly")
COMPILE_MODES = ("auto", "on", "off")  # auto: on for CUDA
BASELINES = ("per_modality",)

# precision, of training (train.amp), prediction (--precision) and the benchmarks: auto is bf16 on a
# CUDA GPU and fp32 on a CPU (bf16 on a CPU is asked for by name; the results were measured in fp32)
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ALIASES = {"off": "fp32"}  # train.amp's word before session 17
