"""Training nodes: Optuna-tuned training of one variant, then the best config again
under every further seed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack
from typing import Any

import pandas as pd
import torch
from torch import nn

from dynamic_ctr.io.parquet_parts import ParquetParts
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.batching import RowGroupData, TensorData, tensors_from_columns
from dynamic_ctr.training.device import resolve_device
from dynamic_ctr.training.distributed import LocalRanks
from dynamic_ctr.training.resume import remove_state
from dynamic_ctr.training.tuning import (
    StudyConfig,
    further_seeds,
    in_process_fitter,
    study_checkpoint_dir,
    trials_table,
    tune,
)

logger = logging.getLogger(__name__)


def frame_to_tensors(frame: pd.DataFrame, spec: FeatureSpec, device: Any, groups: tuple[str, ...] = ()) -> TensorData:
    """The split's index columns as one ``(N, S)`` tensor on ``device`` (moved once)."""
    columns = [*spec.index_columns, spec.label, *groups]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"model input lacks column(s) {missing} named by the feature spec")
    return tensors_from_columns({c: frame[c].to_numpy() for c in columns}, spec, device, group_columns=list(groups))


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def variant_train_frame(train_frame: pd.DataFrame, entry: dict[str, Any]) -> pd.DataFrame:
    """The training rows of a planned variant: the first ``train_rows`` when the plan caps them."""
    return train_frame.iloc[: int(entry["train_rows"])] if entry.get("train_rows") else train_frame


def available_memory_bytes() -> int | None:
    """The memory the OS could give this process now (Linux ``MemAvailable``, else the
    free physical pages); ``None`` when neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def tensor_bytes(rows: int, spec: FeatureSpec) -> int:
    """What ``rows`` training rows take as tensors: ``S`` int64 slots and a float32 label."""
    return rows * (8 * len(spec.index_columns) + 4)


def in_memory_limit_bytes(setting: Any) -> int | None:
    """``training.in_memory_limit_mb``: a number of MB, or ``"auto"``, a quarter of the
    memory available now (reading a split into tensors passes through Arrow and pandas,
    about three times the tensors at its peak). ``None``: unknown, so no limit."""
    if setting == "auto":
        available = available_memory_bytes()
        return None if available is None else available // 4
    return int(float(setting) * 2**20)


def variant_train_data(train: pd.DataFrame | ParquetParts, entry: dict[str, Any], spec: FeatureSpec, device: Any) -> TensorData | RowGroupData:
    """A planned variant's training rows as tensors, or read by row group through a
    shuffle buffer when the split, loaded lazily (``model_input_train`` with
    ``lazy: true``, as the streaming environments load it), would take more than
    ``training.in_memory_limit_mb`` (``entry["in_memory_limit_mb"]``) as tensors."""
    if isinstance(train, ParquetParts):
        limit = int(entry["train_rows"]) if entry.get("train_rows") else None
        rows = len(train) if limit is None else min(limit, len(train))
        need, allowed = tensor_bytes(rows, spec), in_memory_limit_bytes(entry.get("in_memory_limit_mb", "auto"))
        if allowed is not None and need > allowed:
            data = RowGroupData(tuple(str(f) for f in train.files), spec, device, train.shuffle_buffer_rows, limit)
            logger.info(
                "training split read by row group: %d rows (%.0f MB as tensors, over the %.0f MB in-memory limit), "
                "shuffle buffer %d rows", len(data), need / 2**20, allowed / 2**20, data.buffer_rows,
            )  # fmt: skip
            return data
        logger.info("training split read into memory: %d rows, %.0f MB as tensors", rows, need / 2**20)
        train = train.to_pandas([*spec.index_columns, spec.label], dtype_backend=None)
    return frame_to_tensors(variant_train_frame(train, entry), spec, device)


def variant_study_name(variant_name: str, entry: dict[str, Any], feature_spec: dict[str, Any], train_rows: int, valid_rows: int) -> str:
    """``<variant>-<fingerprint>``: the study a planned variant tunes in, from the feature spec,
    the row counts it trains and validates on (after :func:`variant_train_frame`), its base
    config, search space and study seed. The training node and the tuning worker
    (:mod:`dynamic_ctr.training.worker`) both name their study with this."""
    base = {"model": entry["model"], "train": entry["train"]}
    fingerprint = _fingerprint(feature_spec, train_rows, valid_rows, base, entry["search_space"], entry["study"].get("seed"))
    return f"{variant_name}-{fingerprint}"


def not_applicable_summary(variant_name: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"variant": variant_name, "status": "not_applicable", "reason": entry["reason"], "compare_to": entry.get("compare_to")}


def train_variant(
    train_frame: pd.DataFrame,
    valid_frame: pd.DataFrame,
    feature_spec: dict[str, Any],
    plan: dict[str, Any],
    device_name: str,
    *,
    variant_name: str,
) -> tuple[dict[str, nn.Module], dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Tune one variant of the suite plan with Optuna, then retrain its best config
    with every further seed (each seed changes the initial weights and the batch order).

    The study is named after the variant and a fingerprint of the data and the planned
    configuration, so an interrupted run resumes its study, while new data or a new
    search space starts a new one. A variant the plan marks ``not_applicable`` trains
    nothing: its bundle is empty and its summary carries the reason.

    With ``study.checkpoint_dir`` (and an RDB storage) a killed run loses at most the
    epoch in progress: trials resume from ``<checkpoint_dir>/<study>/trial_<n>`` (see
    :mod:`dynamic_ctr.training.tuning`), each further seed from
    ``<checkpoint_dir>/<study>/seed_<s>``. The seeds' directories are kept until every
    seed has finished (so a kill during the last seed does not retrain the earlier
    ones), then deleted with the study's checkpoint directory when it is empty.

    With ``training.data_parallel.ranks`` > 1 (planned per variant: ``entry["data_parallel"]``)
    the node starts that many DDP ranks on this machine once
    (:class:`~dynamic_ctr.training.distributed.LocalRanks`) and every trial and seed trains
    on them; Optuna, pruning and the outputs stay in this process, which receives rank
    0's model. Nothing downstream changes: folding, scoring and reports read the models
    as always.

    Returns:
        ``{"seed_<s>": model}`` (CPU, eval mode), the tuning summary (best params and
        value, study name, device, data-parallel ranks, budget), the study's trials table and the per-epoch
        history of every seed.
    """
    entry = plan["variants"][variant_name]
    if entry["status"] != "ready":
        return {}, not_applicable_summary(variant_name, entry), pd.DataFrame(), pd.DataFrame()
    spec = FeatureSpec.from_dict(feature_spec)
    device = resolve_device(device_name)
    data_parallel = entry.get("data_parallel") or {"ranks": 1, "reason": None}
    ranks = int(data_parallel["ranks"])
    if data_parallel.get("reason"):
        logger.warning("variant %s %s", variant_name, data_parallel["reason"])
    data_device = device if ranks == 1 else torch.device("cpu")  # the ranks move their data themselves
    train_data = variant_train_data(train_frame, entry, spec, data_device)
    if isinstance(valid_frame, ParquetParts):  # validation always scores from memory
        valid_frame = valid_frame.to_pandas(dtype_backend=None)
    valid_data = frame_to_tensors(valid_frame, spec, data_device)
    base = {"model": entry["model"], "train": entry["train"]}
    space, seeds = entry["search_space"], entry["seeds"]
    study_name = variant_study_name(variant_name, entry, feature_spec, len(train_data), len(valid_frame))
    study_cfg = StudyConfig(study_name=study_name, **entry["study"])
    logger.info(
        "variant %s: tuning on %s%s (%d train rows), study %s", variant_name, device,
        f" with {ranks} data-parallel ranks" if ranks > 1 else "", len(train_data), study_cfg.study_name,
    )  # fmt: skip
    with ExitStack() as stack:
        if ranks > 1:  # every trial and seed trains on the same ranks, started once
            fitter = stack.enter_context(LocalRanks(ranks, device_name, spec, train_data, valid_data)).fit
        else:
            fitter = in_process_fitter(spec, train_data, valid_data)
        result = tune(base, space, spec, train_data, valid_data, study_cfg, fitter=fitter)

        models: dict[str, nn.Module] = {f"seed_{seeds[0]}": result.best_model}
        histories = [pd.DataFrame(result.best_history).assign(seed=seeds[0])]
        root = study_checkpoint_dir(study_cfg)
        seed_dirs = {seed: None if root is None else root / f"seed_{seed}" for seed in seeds[1:]}
        for seed, run in further_seeds(fitter, result.best_config, seeds[1:], seed_dirs).items():
            if run.resumed_from_epoch:
                logger.info("variant %s: seed %d resumed after epoch %d", variant_name, seed, run.resumed_from_epoch)
            models[f"seed_{seed}"] = run.model
            histories.append(pd.DataFrame(run.history).assign(seed=seed))
    models = {k: m.to("cpu").eval() for k, m in models.items()}
    for path in seed_dirs.values():
        remove_state(path)
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()

    trials = pd.DataFrame(trials_table(result.study))
    summary = {
        "variant": variant_name,
        "status": "trained",
        "study_name": study_cfg.study_name,
        "device": str(device),
        "data_parallel": data_parallel,
        "best_value": result.best_value,
        "best_params": result.best_params,
        "best_config": result.best_config,
        "retrained_best": result.retrained,
        "seeds": seeds,
        "compare_to": entry.get("compare_to"),
        "budget": {**entry["budget"], "finished_trials": int(trials["state"].isin(["COMPLETE", "PRUNED"]).sum())},
    }
    for column in ("params", "user_attrs"):
        if column in trials:
            trials[column] = trials[column].map(lambda v: json.dumps(v, default=str))
    history = pd.concat(histories, ignore_index=True)
    return models, summary, trials, history
