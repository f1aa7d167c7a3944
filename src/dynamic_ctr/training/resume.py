"""Resume state of one training run: what :func:`~dynamic_ctr.training.loop.train`
writes after every completed epoch so that a killed run continues where it was.

Layout of a resume directory (``train(..., checkpoint_dir=...)``)::

    <directory>/resume.json          the manifest (JSON, below)
    <directory>/state-000003.pt      the state after epoch 3 (``torch.save`` of a
                                     dict of tensors and plain Python values)

The manifest::

    {"format_version": 1, "kind": "dynamic_ctr.resume", "epoch": 3, "stopped": false,
     "state_file": "state-000003.pt", "sha256": "<hex>", "bytes": <size>,
     "fingerprint": "<hex>", "run": {...}}

``run`` describes the run the state belongs to (every :class:`TrainConfig` field that
can change the result, the model's class, config and parameter shapes, the device
type, and a checksum of the training and validation tensors); ``fingerprint`` is the
SHA-256 of its canonical JSON. A state is resumed only by a run with the same
fingerprint; any other run gets a :class:`CheckpointError` listing what differs.

**Writing** is crash-safe at every instant: the state goes to a temporary file
(``fsync``), is renamed to its own epoch-numbered name, then the manifest is
replaced the same way (temporary file, ``fsync``, ``os.replace``, ``fsync`` of the
directory), and only then are older state files deleted. A kill at any point leaves
a manifest that names a complete state file with a matching hash.

**Reading** checks the manifest, the fingerprint, and the state file's size and
SHA-256 *before* the file is parsed; a file that fails is never parsed at all. The
parse itself is ``torch.load(..., weights_only=True)``, whose unpickler builds only
tensors and plain containers and refuses everything else, so a crafted file cannot
run code even with a forged manifest.

**What is kept** (the dict :func:`save_state` writes): ``epoch``, ``stopped``,
``model`` (state dict, buffers included: AdaSparse's annealing step, STAR's running
statistics, MAML's adapted heads), ``optimizer`` (also a :class:`CombinedOptimizer`'s
per-role states: FTRL's ``z``/``n``, LazyAdam's moments), ``scaler`` (GradScaler),
``best_state``, ``best_auc``, ``best_epoch``, ``epochs_without_improvement``,
``history``, ``last_finite`` and ``rng``: torch's global generator (dropout), the
shuffling generator, the CUDA generator of the device when on CUDA, NumPy's and
Python's global generators. Every generator is captured after the epoch's validation
(and MAML's adaptation), i.e. exactly where the next epoch starts drawing, so a
resumed run is bit-identical to an uninterrupted one on the CPU.

Needs torch only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dynamic_ctr.training.batching import RowGroupData
from dynamic_ctr.training.checkpoint import CheckpointError, sha256_file

if TYPE_CHECKING:
    from dynamic_ctr.training.batching import TensorData
    from dynamic_ctr.training.loop import TrainConfig

__all__ = [
    "MANIFEST_NAME",
    "RESUME_FORMAT",
    "CheckpointError",
    "capture_rng",
    "load_state",
    "read_manifest",
    "remove_state",
    "restore_rng",
    "run_description",
    "save_state",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "resume.json"
RESUME_FORMAT = 1
_KIND = "dynamic_ctr.resume"
_STATE_FILE = re.compile(r"state-(\d{6})\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: TrainConfig fields that cannot change the result (display and host-sync cadence).
_COSMETIC_FIELDS = frozenset({"progress", "log_every"})
_STATE_KEYS = {
    "epoch": int,
    "stopped": bool,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "best_auc": float,
    "best_epoch": int,
    "epochs_without_improvement": int,
    "history": list,
    "rng": dict,
}


# ---------------------------------------------------------------- run description


def _data_summary(data: TensorData | RowGroupData) -> dict[str, Any]:
    """Shape and an order-sensitive checksum of one split (a few passes on the device);
    for a split read by row group, its files' sizes and row groups."""
    if isinstance(data, RowGroupData):
        return data.summary()
    n, s = data.x.shape
    rows = data.x.sum(dim=1)  # (N,) int64
    weight = torch.arange(n, device=data.x.device, dtype=torch.int64) % 65521 + 1
    x_sum = int((rows * weight).sum().item())  # int64 arithmetic: wraps, deterministically
    positives = int(data.y.double().sum().item())
    y_weighted = float((data.y.double() * weight.double()).sum().item())
    return {"rows": int(n), "slots": int(s), "x_checksum": x_sum, "positives": positives, "y_checksum": y_weighted}


def _json_able(value: Any) -> Any:
    """``value`` made canonical-JSON-able (unknown objects by ``repr``)."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def run_description(model: nn.Module, cfg: TrainConfig, train: TensorData | RowGroupData, valid: TensorData) -> dict[str, Any]:
    """What a resume state belongs to: every result-relevant :class:`TrainConfig`
    field, the model (class, ``config`` if any, parameter/buffer names, shapes and
    dtypes), the device type and a checksum of both splits. JSON-able."""
    train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _COSMETIC_FIELDS}
    state = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    return _json_able(
        {
            "train_config": train_cfg,
            "model": {
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "config": getattr(model, "config", None),
                "state": state,
            },
            "device": train.device.type,
            "data": {"train": _data_summary(train), "valid": _data_summary(valid)},
        }
    )


def _fingerprint(run: Mapping[str, Any]) -> str:
    text = json.dumps(run, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (for the error message)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(where)
            else:
                out += _differences(saved[key], current[key], where)
        return out
    if saved != current:
        if isinstance(saved, list) and isinstance(current, list) and len(saved) != len(current):
            return [f"{path} (length {len(saved)} vs {len(current)})"]
        return [f"{path} ({_short(saved)} vs {_short(current)})"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- generators


def capture_rng(shuffle_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The state of every generator a training epoch may draw from (tensors and ints)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "shuffle": shuffle_gen.get_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: Mapping[str, Any], shuffle_gen: torch.Generator, device: torch.device) -> None:
    """Set every generator :func:`capture_rng` recorded."""
    torch.set_rng_state(rng["torch"].cpu())
    shuffle_gen.set_state(rng["shuffle"].cpu())
    np_rng = rng["numpy"]
    np.random.set_state(
        ("MT19937", np_rng["keys"].numpy().astype(np.uint32), np_rng["pos"], np_rng["has_gauss"], np_rng["cached_gaussian"])
    )
    py = rng["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


# ---------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary sibling, ``fsync``, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def save_state(directory: str | os.PathLike[str], state: Mapping[str, Any], run: Mapping[str, Any]) -> Path:
    """Write ``state`` (the dict described in the module docstring) as the resume
    state of ``directory``, crash-safely; older states there are deleted afterwards.

    Args:
        directory: the run's resume directory (created if needed).
        state: tensors and plain Python values only (``int``, ``float``, ``bool``,
            ``str``, ``None``, lists, tuples, dicts).
        run: :func:`run_description` of the run.

    Returns:
        The path of the state file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    epoch = int(state["epoch"])
    name = f"state-{epoch:06d}.pt"
    path = directory / name
    _write_atomic(path, lambda f: torch.save(dict(state), f))
    digest, size = sha256_file(path)
    manifest = {
        "format_version": RESUME_FORMAT,
        "kind": _KIND,
        "epoch": epoch,
        "stopped": bool(state["stopped"]),
        "state_file": name,
        "sha256": digest,
        "bytes": size,
        "fingerprint": _fingerprint(run),
        "run": run,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=True) + "\n"
    _write_atomic(directory / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")))
    _fsync_dir(directory)
    for old in directory.iterdir():  # earlier epochs, and temporaries of killed writers
        if old.name != name and (_STATE_FILE.fullmatch(old.name) or old.name.startswith(".") and ".tmp-" in old.name):
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked manifest of ``directory``; ``None`` when there is none (no
    completed epoch yet, or no such directory).

    Raises:
        CheckpointError: the manifest is not JSON or not a resume manifest of this
            format (names the file and the problem).
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the resume state is damaged, delete {path.parent} to start afresh") from None
    problems = []
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("kind") != _KIND or manifest.get("format_version") != RESUME_FORMAT:
        problems.append(
            f"kind={manifest.get('kind')!r}, format_version={manifest.get('format_version')!r} "
            f"(expected {_KIND!r}, {RESUME_FORMAT})"
        )
    epoch = manifest.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1):
        problems.append(f"epoch={epoch!r} must be an int >= 1")
    if not isinstance(manifest.get("stopped"), bool):
        problems.append(f"stopped={manifest.get('stopped')!r} must be a bool")
    name = manifest.get("state_file")
    if not (isinstance(name, str) and _STATE_FILE.fullmatch(name) and int(name[6:12]) == epoch):
        problems.append(f"state_file={name!r} must be 'state-<epoch, 6 digits>.pt' of this epoch")
    for key in ("sha256", "fingerprint"):
        if not (isinstance(manifest.get(key), str) and _SHA256.fullmatch(manifest[key])):
            problems.append(f"{key}={manifest.get(key)!r} must be 64 hex digits")
    size = manifest.get("bytes")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        problems.append(f"bytes={size!r} must be a positive int")
    if not isinstance(manifest.get("run"), dict):
        problems.append("run must be an object")
    if problems:
        raise CheckpointError(f"{path}: not a valid resume manifest: {'; '.join(problems)}")
    return manifest


def load_state(
    directory: str | os.PathLike[str], run: Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> dict[str, Any] | None:
    """The resume state saved in ``directory`` for the run described by ``run``;
    ``None`` when ``directory`` holds none.

    Checked, in this order, before anything is parsed: the manifest, that it belongs
    to ``run`` (same fingerprint), that the state file exists with the recorded size
    and SHA-256. Then ``torch.load(..., weights_only=True)`` and a check of the
    dict's keys and types.

    Raises:
        CheckpointError: any check fails; the message names the file, what is wrong,
            and (for another run's state) which settings differ.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    manifest_path = directory / MANIFEST_NAME
    if manifest["fingerprint"] != _fingerprint(run):
        stored_ok = manifest["fingerprint"] == _fingerprint(manifest["run"])
        diff = _differences(manifest["run"], _json_able(dict(run))) if stored_ok else ["the manifest's own run description (edited?)"]
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise CheckpointError(
            f"{manifest_path}: the resume state belongs to another training run (differs in: {shown}); "
            f"refusing to resume it. Delete {directory} to start this run afresh"
        )
    path = directory / manifest["state_file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, but {manifest_path} names it; the resume state is incomplete")
    digest, size = sha256_file(path)
    if size != manifest["bytes"]:
        raise CheckpointError(
            f"{path}: {size} bytes, but {manifest_path} records {manifest['bytes']} (truncated or replaced); refusing to load it"
        )
    if digest != manifest["sha256"]:
        raise CheckpointError(
            f"{path}: SHA-256 {digest} does not match {manifest['sha256']} recorded in {manifest_path} "
            "(corrupted or tampered with); refusing to load it"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (the restricted unpickler refused it, or a broken zip)
        raise CheckpointError(f"{path}: cannot be read as a resume state ({type(e).__name__}: {e})") from None
    problems = _state_problems(state, manifest)
    if problems:
        raise CheckpointError(f"{path}: not a valid resume state: {'; '.join(problems)}")
    return state


def _state_problems(state: Any, manifest: Mapping[str, Any]) -> list[str]:
    if not isinstance(state, dict):
        return [f"expected a dict, got {type(state).__name__}"]
    problems = []
    for key, kind in _STATE_KEYS.items():
        value = state.get(key)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            problems.append(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    if problems:
        return problems
    if state["epoch"] != manifest["epoch"] or state["stopped"] != manifest["stopped"]:
        problems.append(f"epoch/stopped {state['epoch']}/{state['stopped']} differ from the manifest's")
    if len(state["history"]) != state["epoch"]:
        problems.append(f"history has {len(state['history'])} epochs, expected {state['epoch']}")
    if not isinstance(state.get("best_state"), dict):
        problems.append("best_state must be a dict of tensors")
    if not (state.get("last_finite") is None or isinstance(state["last_finite"], float)):
        problems.append("last_finite must be a float or None")
    if not all(isinstance(state["rng"].get(k), Tensor) for k in ("torch", "shuffle")):
        problems.append("rng must hold the 'torch' and 'shuffle' generator states")
    if not math.isfinite(state["best_auc"]) or not 1 <= state["best_epoch"] <= state["epoch"]:
        problems.append(f"best_auc={state['best_auc']}, best_epoch={state['best_epoch']} are not those of a completed epoch")
    return problems


def remove_state(directory: str | os.PathLike[str] | None) -> None:
    """Delete a resume directory (nothing happens when it does not exist)."""
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
