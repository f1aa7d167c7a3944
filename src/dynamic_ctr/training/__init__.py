"""Training, evaluation, checkpoints and tuning for dynamic-parameter CTR models.

Importing this package needs torch, numpy, tqdm and safetensors only:
scikit-learn is imported by ``auc``/``log_loss`` when called, and the Optuna-based
names (``tune``, ``run_study``, ``StudyConfig`` ...) are loaded from
:mod:`dynamic_ctr.training.tuning` on first access.

Typical use::

    device = resolve_device("auto")
    tr = tensors_from_columns(train_columns, spec, device)
    va = tensors_from_columns(valid_columns, spec, device)
    result = train(build_model(config, spec), tr, va, TrainConfig(lr=1e-3))
    save_checkpoint(result.model, "data/06_models/apg")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dynamic_ctr.training.batching import TensorData, batches, num_batches, tensors_from_columns
from dynamic_ctr.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from dynamic_ctr.training.device import make_generator, resolve_device, seed_everything
from dynamic_ctr.training.loop import (
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    make_optimizer,
    train,
)
from dynamic_ctr.training.metrics import auc, evaluate, gauc, log_loss

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ loads these lazily
    from dynamic_ctr.training.tuning import (  # noqa: F401
        StudyConfig,
        TuneResult,
        apply_overrides,
        decode_params,
        finished_trials,
        run_study,
        suggest,
        trials_table,
        tune,
        validate_space,
    )

_TUNING_NAMES = (
    "StudyConfig",
    "TuneResult",
    "apply_overrides",
    "decode_params",
    "finished_trials",
    "run_study",
    "suggest",
    "trials_table",
    "tune",
    "validate_space",
)

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "TensorData",
    "TrainConfig",
    "TrainResult",
    "auc",
    "batches",
    "evaluate",
    "gauc",
    "load_checkpoint",
    "log_loss",
    "make_generator",
    "make_optimizer",
    "num_batches",
    "read_config",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "tensors_from_columns",
    "train",
    *_TUNING_NAMES,  # from dynamic_ctr.training.tuning, loaded lazily
]


def __getattr__(name: str) -> Any:
    """Load the optuna-dependent names lazily (PEP 562)."""
    if name in _TUNING_NAMES:
        return getattr(importlib.import_module("dynamic_ctr.training.tuning"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
