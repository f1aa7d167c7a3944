"""Checkpoints: safetensors weights plus a JSON config that rebuilds the model.

Layout of a checkpoint directory::

    <directory>/model.safetensors   state dict (contiguous CPU tensors)
    <directory>/config.json         {"format_version": 1, "model": model.config,
                                     "spec": model.spec.to_dict(),
                                     "weights": {"file": "model.safetensors",
                                                 "sha256": "<hex>", "bytes": <size>}}

Nothing is pickled. Saving is atomic: both files are written into a temporary
sibling directory which is then renamed into place, so ``directory`` either holds
a complete checkpoint or is left as it was.

**Integrity.** ``config.json`` records the SHA-256 and the size of
``model.safetensors``; :func:`load_checkpoint` checks both before it parses a byte
of the weights, so a truncated, corrupted or swapped weights file is refused with a
:class:`CheckpointError` naming the file. The hash guards against accidents (a
partial copy, a flipped bit, a file from another checkpoint), not against someone
who can rewrite both files; safetensors never executes code whatever the bytes.
Checkpoints written before the hash was recorded (no ``weights`` entry, same
``format_version``) still load, without the check, with a warning logged; their
safetensors header is still validated by the parser (a truncated file fails).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
    "CheckpointError",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

ModelBuilder = Callable[[dict[str, Any], FeatureSpec], nn.Module]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint (model or resume state) is damaged, tampered with, of an unknown
    format or of another run; the message names the file and what is wrong."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> tuple[str, int]:
    """``(hex SHA-256, size in bytes)`` of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


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
    config = {"format_version": FORMAT_VERSION, "model": model.config, "spec": model.spec.to_dict()}
    try:  # checked before anything touches the disk
        json.dumps(config, allow_nan=False)
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
        _fsync(tmp / WEIGHTS_NAME)
        digest, size = sha256_file(tmp / WEIGHTS_NAME)  # of the bytes on disk
        config["weights"] = {"file": WEIGHTS_NAME, "sha256": digest, "bytes": size}
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        (tmp / CONFIG_NAME).write_text(config_text + "\n", encoding="utf-8")
        _fsync(tmp / CONFIG_NAME)
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
    """The parsed ``config.json`` of a checkpoint (``format_version`` checked).

    Raises:
        CheckpointError: the file is not JSON, has another ``format_version``, lacks
            ``model``/``spec`` or has a malformed ``weights`` entry (names the file).
        FileNotFoundError: no ``config.json`` in ``directory``.
    """
    path = Path(directory) / CONFIG_NAME
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r}, expected {FORMAT_VERSION}")
    for key in ("model", "spec"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key {key!r}")
    weights = config.get("weights")
    if weights is not None:
        ok = (
            isinstance(weights, dict)
            and weights.get("file") == WEIGHTS_NAME
            and isinstance(weights.get("sha256"), str)
            and _SHA256.fullmatch(weights["sha256"]) is not None
            and isinstance(weights.get("bytes"), int)
            and not isinstance(weights["bytes"], bool)
            and weights["bytes"] >= 0
        )
        if not ok:
            raise CheckpointError(
                f"{path}: malformed 'weights' entry {weights!r}; expected "
                f"{{'file': {WEIGHTS_NAME!r}, 'sha256': <64 hex digits>, 'bytes': <int>}}"
            )
    return config


def _read_weights(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict in ``model.safetensors``, its size and SHA-256 checked against
    ``config`` first (when it records them); every failure is a :class:`CheckpointError`."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    expected = config.get("weights")
    if expected is not None:
        digest, size = sha256_file(path)  # streamed: no second copy of a large table in memory
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, but {directory / CONFIG_NAME} records {expected['bytes']} "
                "(truncated or replaced); refusing to load it"
            )
        if digest != expected["sha256"]:
            raise CheckpointError(
                f"{path}: SHA-256 {digest} does not match {expected['sha256']} recorded in "
                f"{directory / CONFIG_NAME} (corrupted or tampered with); refusing to load it"
            )
    else:
        logger.warning(
            "%s: no SHA-256 recorded in %s (a checkpoint written before hashes were recorded); "
            "loading it without an integrity check", path, CONFIG_NAME,
        )  # fmt: skip
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001  (SafetensorError and friends: a damaged header or payload)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_checkpoint(
    directory: str | os.PathLike[str],
    builder: ModelBuilder | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint`.

    The weights file's size and SHA-256 are checked against ``config.json`` before
    it is parsed (module docstring: checkpoints without a recorded hash load with a
    warning). Nothing is unpickled.

    Args:
        directory: the checkpoint directory.
        builder: ``builder(model_config, spec) -> nn.Module``; ``None`` =
            ``dynamic_ctr.models.build_model`` (imported here, lazily).
        device: where the returned model lives.

    Returns:
        The model with the saved weights (strict key match), on ``device``, in eval mode.

    Raises:
        CheckpointError: a damaged, truncated or tampered-with ``config.json`` or
            ``model.safetensors`` (the message names the file).
    """
    directory = Path(directory)
    config = read_config(directory)
    state = _read_weights(directory, config)  # checked before anything is built
    if builder is None:
        from dynamic_ctr.models import build_model as builder
    spec = FeatureSpec.from_dict(config["spec"])
    model = builder(config["model"], spec)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
