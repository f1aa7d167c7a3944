"""Checkpoints: safetensors weights plus a JSON config that rebuilds the model.

Layout of a checkpoint directory::

    <directory>/model.safetensors   state dict (contiguous CPU tensors)
    <directory>/config.json         {"format_version": 1, "model": model.config,
                                     "spec": model.spec.to_dict()}

Nothing is pickled. Saving is atomic: both files are written into a temporary
sibling directory which is then renamed into place, so ``directory`` either holds
a complete checkpoint or is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dynamic_ctr.spec import FeatureSpec

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

ModelBuilder = Callable[[dict[str, Any], FeatureSpec], nn.Module]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``directory`` atomically (see the module docstring).

    An existing checkpoint at ``directory`` is replaced; if the save fails, it is
    left intact and no partial or temporary directory remains.

    Args:
        model: a built model with attributes ``config`` (JSON-able dict) and
            ``spec`` (:class:`FeatureSpec`).
        directory: the checkpoint directory; its parent is created if needed.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: ``model`` lacks ``config``/``spec`` or its config is not JSON-able.
        FileExistsError: ``directory`` exists and holds something other than a
            checkpoint (never deleted).
    """
    directory = Path(directory)
    for attr in ("config", "spec"):
        if not hasattr(model, attr):
            raise ValueError(
                f"model has no attribute {attr!r}; build it with dynamic_ctr.models.build_model"
            )
    try:
        config_text = json.dumps(
            {"format_version": FORMAT_VERSION, "model": model.config, "spec": model.spec.to_dict()},
            indent=2,
            sort_keys=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.config is not JSON-serialisable: {e}") from e
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        foreign = sorted(
            p.name for p in directory.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)
        )
        if foreign:
            raise FileExistsError(
                f"{directory} exists and holds non-checkpoint files {foreign}; not replacing it"
            )

    # to(copy=True) also unties shared storage (tied weights), which safetensors rejects
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text + "\n", encoding="utf-8")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=parent))
            os.replace(directory, old)  # rename over the empty placeholder dir
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old is not None:
                os.replace(old, directory)  # put the previous checkpoint back
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint (``format_version`` checked)."""
    path = Path(directory) / CONFIG_NAME
    config = json.loads(path.read_text(encoding="utf-8"))
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={version!r}, expected {FORMAT_VERSION}")
    for key in ("model", "spec"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    return config


def load_checkpoint(
    directory: str | os.PathLike[str],
    builder: ModelBuilder | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint`.

    Args:
        directory: the checkpoint directory.
        builder: ``builder(model_config, spec) -> nn.Module``; ``None`` =
            ``dynamic_ctr.models.build_model`` (imported here, lazily).
        device: where the returned model lives.

    Returns:
        The model with the saved weights (strict key match), on ``device``, in eval mode.
    """
    directory = Path(directory)
    config = read_config(directory)
    if builder is None:
        from dynamic_ctr.models import build_model as builder
    spec = FeatureSpec.from_dict(config["spec"])
    model = builder(config["model"], spec)
    state = safetensors.torch.load_file(str(directory / WEIGHTS_NAME), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
