"""Training nodes: Optuna-tuned training of one variant, then the best config again
under every further seed."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

import pandas as pd
from torch import nn

from dynamic_ctr.models import build_model
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.batching import TensorData, tensors_from_columns
from dynamic_ctr.training.device import resolve_device, seed_everything
from dynamic_ctr.training.loop import TrainConfig, train
from dynamic_ctr.training.tuning import StudyConfig, apply_overrides, trials_table, tune

logger = logging.getLogger(__name__)


def frame_to_tensors(frame: pd.DataFrame, spec: FeatureSpec, device: Any, groups: tuple[str, ...] = ()) -> TensorData:
    """The split's index columns as one ``(N, S)`` tensor on ``device`` (moved once)."""
    columns = [*spec.index_columns, spec.label, *groups]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"model input lacks column(s) {missing} named by the feature spec")
    return tensors_from_columns({c: frame[c].to_numpy() for c in columns}, spec, device, group_columns=list(groups))


VARIANT_KEYS = {"model", "train", "study", "seeds", "search_space", "compare_to"}


def variant_settings(training: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """``training`` with the variant's own ``train``, ``study``, ``seeds`` and
    ``search_space`` laid over it (e.g. fewer trials for an expensive variant)."""
    unknown = set(variant) - VARIANT_KEYS
    if unknown:
        raise ValueError(f"variant parameters have unknown key(s) {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
    if "model" not in variant:
        raise ValueError("variant parameters need a 'model' config")
    return {
        **training,
        "train": {**training["train"], **(variant.get("train") or {})},
        "study": {**training["study"], **(variant.get("study") or {})},
        "seeds": [int(s) for s in variant.get("seeds") or training["seeds"]],
        "search_space": copy.deepcopy(variant.get("search_space") or training["search_space"]),
    }


def base_config(settings: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """The variant's base config ``{model, train}``, seeded with its first seed;
    ``settings`` is :func:`variant_settings`' result."""
    return {"model": copy.deepcopy(variant["model"]), "train": {**settings["train"], "seed": settings["seeds"][0]}}


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def train_variant(
    train_frame: pd.DataFrame,
    valid_frame: pd.DataFrame,
    feature_spec: dict[str, Any],
    training: dict[str, Any],
    variant: dict[str, Any],
    *,
    variant_name: str,
) -> tuple[dict[str, nn.Module], dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Tune one variant with Optuna, then retrain its best config with every seed.

    The study is named after the variant and a fingerprint of the data and the
    configuration, so an interrupted run resumes its study, while new data or a new
    search space starts a new one.

    Returns:
        ``{"seed_<s>": model}`` (CPU, eval mode), the tuning summary (best params and
        value, study name, device), the study's trials table and the per-epoch history
        of every seed.
    """
    spec = FeatureSpec.from_dict(feature_spec)
    training = variant_settings(training, variant)
    device = resolve_device(training.get("device", "auto"))
    train_data = frame_to_tensors(train_frame, spec, device)
    valid_data = frame_to_tensors(valid_frame, spec, device)
    base, space = base_config(training, variant), training["search_space"]
    study_params = dict(training["study"])
    fingerprint = _fingerprint(feature_spec, len(train_frame), len(valid_frame), base, space, study_params.get("seed"))
    study_cfg = StudyConfig(study_name=f"{variant_name}-{fingerprint}", **study_params)
    logger.info("variant %s: tuning on %s (%d train rows), study %s", variant_name, device, len(train_data), study_cfg.study_name)
    result = tune(base, space, spec, train_data, valid_data, study_cfg)

    seeds = training["seeds"]
    models: dict[str, nn.Module] = {f"seed_{seeds[0]}": result.best_model}
    histories = [pd.DataFrame(result.best_history).assign(seed=seeds[0])]
    for seed in seeds[1:]:
        config = apply_overrides(result.best_config, {"train.seed": seed})
        seed_everything(seed)
        model = build_model(copy.deepcopy(config["model"]), spec)
        run = train(model, train_data, valid_data, TrainConfig.from_dict(config["train"]))
        models[f"seed_{seed}"] = run.model
        histories.append(pd.DataFrame(run.history).assign(seed=seed))
    models = {k: m.to("cpu").eval() for k, m in models.items()}

    summary = {
        "variant": variant_name,
        "study_name": study_cfg.study_name,
        "device": str(device),
        "best_value": result.best_value,
        "best_params": result.best_params,
        "best_config": result.best_config,
        "retrained_best": result.retrained,
        "seeds": seeds,
        "compare_to": variant.get("compare_to"),
    }
    trials = pd.DataFrame(trials_table(result.study))
    for column in ("params", "user_attrs"):
        if column in trials:
            trials[column] = trials[column].map(lambda v: json.dumps(v, default=str))
    history = pd.concat(histories, ignore_index=True)
    return models, summary, trials, history
