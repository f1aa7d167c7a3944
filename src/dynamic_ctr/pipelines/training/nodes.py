"""Training nodes: Optuna-tuned training of one variant, then the best config again
under every further seed."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pandas as pd
from torch import nn

from dynamic_ctr.io.parquet_parts import ParquetParts
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.batching import RowGroupData, TensorData, tensors_from_columns
from dynamic_ctr.training.device import resolve_device
from dynamic_ctr.training.resume import remove_state
from dynamic_ctr.training.tuning import (
    StudyConfig,
    apply_overrides,
    fit,
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


def variant_train_data(train: pd.DataFrame | ParquetParts, entry: dict[str, Any], spec: FeatureSpec, device: Any) -> TensorData | RowGroupData:
    """A planned variant's training rows as tensors, or, for a split loaded lazily
    (``model_input_train`` with ``lazy: true``), read by row group through a shuffle buffer."""
    if isinstance(train, ParquetParts):
        limit = int(entry["train_rows"]) if entry.get("train_rows") else None
        data = RowGroupData(tuple(str(f) for f in train.files), spec, device, train.shuffle_buffer_rows, limit)
        logger.info("training split read by row group: %d rows, shuffle buffer %d rows", len(data), data.buffer_rows)
        return data
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

    Returns:
        ``{"seed_<s>": model}`` (CPU, eval mode), the tuning summary (best params and
        value, study name, device, budget), the study's trials table and the per-epoch
        history of every seed.
    """
    entry = plan["variants"][variant_name]
    if entry["status"] != "ready":
        return {}, not_applicable_summary(variant_name, entry), pd.DataFrame(), pd.DataFrame()
    spec = FeatureSpec.from_dict(feature_spec)
    device = resolve_device(device_name)
    train_data = variant_train_data(train_frame, entry, spec, device)
    if isinstance(valid_frame, ParquetParts):  # validation always scores from memory
        valid_frame = valid_frame.to_pandas(dtype_backend=None)
    valid_data = frame_to_tensors(valid_frame, spec, device)
    base = {"model": entry["model"], "train": entry["train"]}
    space, seeds = entry["search_space"], entry["seeds"]
    study_name = variant_study_name(variant_name, entry, feature_spec, len(train_data), len(valid_frame))
    study_cfg = StudyConfig(study_name=study_name, **entry["study"])
    logger.info("variant %s: tuning on %s (%d train rows), study %s", variant_name, device, len(train_data), study_cfg.study_name)
    result = tune(base, space, spec, train_data, valid_data, study_cfg)

    models: dict[str, nn.Module] = {f"seed_{seeds[0]}": result.best_model}
    histories = [pd.DataFrame(result.best_history).assign(seed=seeds[0])]
    root = study_checkpoint_dir(study_cfg)
    seed_dirs = {seed: None if root is None else root / f"seed_{seed}" for seed in seeds[1:]}
    for seed in seeds[1:]:
        config = apply_overrides(result.best_config, {"train.seed": seed})
        run = fit(config, spec, train_data, valid_data, checkpoint_dir=seed_dirs[seed])
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
