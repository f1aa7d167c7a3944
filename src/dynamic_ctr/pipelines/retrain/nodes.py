"""Scheduled retraining: one cycle per run on the newest partition of a click log.

A cycle (``kedro run --pipeline retrain``):

1. reads the cycle's partitions (:func:`~dynamic_ctr.data.partitions.plan_cycle`): the
   holdout (the newest, never trained on) and the training window before it, each
   through the ingestion adapter, refusing an empty, corrupt or one-class partition
   by name before anything is trained;
2. encodes them with the champion's encoders (new values map to OOV and are counted),
   or, with ``retrain.vocabulary: rolling``, with vocabularies refitted on the window
   (the champion's embedding rows of known values are carried over);
3. trains a warm-started challenger from the champion's weights on a short schedule,
   and a cold-started one when asked (the first cycle, with no champion, trains only
   the cold one on ``bootstrap_window`` partitions);
4. scores champion and challengers on the holdout (AUC, LogLoss, GAUC over domains) and
   tests each challenger against the champion (paired DeLong);
5. promotes the best challenger only if it beats the champion by ``promotion.margin``
   AUC with ``p < promotion.alpha``, and saves the new champion release (the old one
   again when nobody won) with the promotion record and the drift report.

Nothing is overwritten: each cycle writes new versions, and ``kedro run --pipeline
rollback --load-versions retrain.rollback_target:<version>`` makes an earlier champion
current again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import nn

import dynamic_ctr
from dynamic_ctr.data.adapters import get_adapter
from dynamic_ctr.data.domains import DomainEncoder
from dynamic_ctr.data.drift import drift_table
from dynamic_ctr.data.encoder import FeatureEncoder, item_list_lookup
from dynamic_ctr.data.partitions import plan_cycle, weekly_partitions
from dynamic_ctr.data.raw import RawTable
from dynamic_ctr.io.release import Release
from dynamic_ctr.models import build_model, count_parameters
from dynamic_ctr.models.embedding import carry_over_embeddings
from dynamic_ctr.pipelines.domains.nodes import encode_rows, fit_domains, spec_with_domain
from dynamic_ctr.pipelines.features.nodes import fit_encoder
from dynamic_ctr.pipelines.planning.nodes import deep_merge, resolve_roles
from dynamic_ctr.pipelines.reporting.nodes import figure_html, score_metrics
from dynamic_ctr.pipelines.suite import SUITES
from dynamic_ctr.pipelines.training.nodes import frame_to_tensors
from dynamic_ctr.significance import delong_test
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.device import resolve_device, seed_everything
from dynamic_ctr.training.loop import TrainConfig, train
from dynamic_ctr.training.metrics import auc, evaluate
from dynamic_ctr.training.resume import remove_state

logger = logging.getLogger(__name__)

PARAM_KEYS = {
    "partition_role", "partitioning", "as_of", "window", "bootstrap_window", "variants", "vocabulary",
    "warm_start", "cold_start", "promotion", "seed", "checkpoint_dir",
}
PARTITION_COLUMN = "partition"


class RetrainError(ValueError):
    """A cycle that cannot run on its partitions or parameters (nothing was trained)."""


def check_params(retrain: dict[str, Any]) -> None:
    unknown = set(retrain) - PARAM_KEYS
    if unknown:
        raise RetrainError(f"unknown retrain parameter(s) {sorted(unknown)}; known: {sorted(PARAM_KEYS)}")
    if retrain.get("vocabulary", "champion") not in ("champion", "rolling"):
        raise RetrainError(f"retrain.vocabulary={retrain['vocabulary']!r} must be 'champion' or 'rolling'")
    for key in ("margin", "alpha"):
        if key not in (retrain.get("promotion") or {}):
            raise RetrainError(f"retrain.promotion.{key} is missing")
    if not (retrain.get("warm_start") or {}).get("enabled", True) and not (retrain.get("cold_start") or {}).get("enabled", False):
        raise RetrainError("retrain.warm_start.enabled and retrain.cold_start.enabled are both false: a cycle would have no challenger")
    variants = retrain.get("variants")
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) and set(v) == {"suite", "name"} for v in variants):
        raise RetrainError(f"retrain.variants={variants!r} must be a non-empty list of {{suite, name}}")
    if not 0 < retrain["promotion"]["alpha"] <= 1:
        raise RetrainError(f"retrain.promotion.alpha={retrain['promotion']['alpha']!r} must be in (0, 1]")


# ---------------------------------------------------------------- partitions


def partition_log(raw_source: dict[str, RawTable | None], retrain: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The shipped log cut into weekly partitions (``kedro run --pipeline partition_log``)."""
    check_params(retrain)
    role, cut = retrain["partition_role"], retrain["partitioning"]
    raw = raw_source.get(role)
    if raw is None:
        raise RetrainError(f"retrain.partition_role={role!r} is not a file of raw_source: {sorted(raw_source)}")
    parts = weekly_partitions(raw, cut["time_column"], cut.get("unit", "s"), int(cut.get("min_rows", 1)))
    logger.info("%s: %d rows in %d weekly partitions (%s .. %s)", raw.path, raw.rows_read, len(parts), min(parts), max(parts))
    return parts


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ingest_partition(name: str, raw: RawTable, side: dict[str, RawTable | None], role: str, ingestion: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], dict[str, Any]]:
    if raw.rows_read == 0:
        raise RetrainError(f"partition {name} ({raw.path}) is empty")
    result = get_adapter(ingestion["adapter"])({**side, role: raw}, dict(ingestion.get("options") or {}))
    lost = result.quarantine.total(raw.path)
    allowed = float(ingestion.get("max_quarantine_share", 0.01))
    if lost / raw.rows_read > allowed or result.table.empty:
        raise RetrainError(
            f"partition {name} ({raw.path}) is corrupt: {lost} of {raw.rows_read} rows quarantined "
            f"{result.quarantine.counts(raw.path)} (ingestion.max_quarantine_share={allowed:.2%})"
        )
    info = {"file": raw.path, "sha256": _file_sha256(raw.path), "rows_read": raw.rows_read, "rows_kept": len(result.table), "rows_quarantined": lost}
    return result.table.assign(**{PARTITION_COLUMN: name}), result.quarantine.frame(), result.schema.to_dict(), info


def _check_classes(frame: pd.DataFrame, what: str) -> None:
    labels = set(frame["label"].astype("int64").unique().tolist())
    if labels != {0, 1}:
        raise RetrainError(f"{what} holds only label(s) {sorted(labels)}: AUC needs both classes; the champion is left as it is")


def load_cycle(
    partitions: dict[str, Callable[[], RawTable]],
    side_tables: dict[str, RawTable | None],
    champion: Release | None,
    ingestion: dict[str, Any],
    retrain: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read, type and check the cycle's partitions.

    Returns:
        The training window's clean rows (``partition`` column added), the holdout's,
        their quarantine, and the cycle (its partitions with file hashes, the
        champion it challenges, the schema).

    Raises:
        RetrainError: an empty, corrupt or one-class partition (named), bad parameters.
    """
    check_params(retrain)
    plan = plan_cycle(list(partitions), retrain.get("as_of"), int(retrain["window"]), champion is None, retrain.get("bootstrap_window"))
    seen = max((champion or {"meta": {}})["meta"].get("trained_on") or [""])
    if plan.holdout <= seen:
        raise RetrainError(
            f"holdout {plan.holdout} is not newer than the champion's training data (up to {seen}): "
            "it would be scored on rows it trained on; set retrain.as_of to a later partition"
        )
    role = retrain["partition_role"]
    side = {k: v for k, v in side_tables.items() if k != role}
    tables, quarantines, infos, schema = {}, [], {}, None
    for name in plan.partitions:
        try:
            raw = partitions[name]()
        except Exception as e:  # the reader's own message (under Kedro's wrapper) names the file and line
            raise RetrainError(f"partition {name} cannot be read: {e.__cause__ or e}") from e
        tables[name], quarantine, schema, infos[name] = _ingest_partition(name, raw, side, role, ingestion)
        quarantines.append(quarantine)
    _check_classes(tables[plan.holdout], f"holdout partition {plan.holdout} ({infos[plan.holdout]['file']})")
    _check_classes(tables[plan.valid], f"validation partition {plan.valid} ({infos[plan.valid]['file']})")
    window = pd.concat([tables[n] for n in (*plan.train, plan.valid)], ignore_index=True)
    _check_classes(window[window[PARTITION_COLUMN] != plan.valid], f"training partitions {plan.train[0]} .. {plan.train[-1]}")
    cycle = {
        **plan.to_dict(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "partitions": infos,
        "champion": None if champion is None else {k: champion["meta"].get(k) for k in ("version", "model_id", "variant", "trained_in_cycle")},
        "schema": schema,
    }
    logger.info("retrain cycle: holdout %s, window %s .. %s (%d rows), bootstrap=%s", plan.holdout, plan.train[0], plan.valid, len(window), plan.bootstrap)
    return window, tables[plan.holdout], pd.concat(quarantines, ignore_index=True), cycle


# ---------------------------------------------------------------- encoding


def _variant_model(suites: dict[str, Any], variant: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
    suite, name = variant.get("suite"), variant.get("name")
    params = suites.get(suite)
    if params is None or name not in (params.get("variants") or {}):
        raise RetrainError(f"retrain.variants: {variant!r} names no variant of the suites {sorted(suites)}")
    entry = deep_merge(params.get("defaults") or {}, params["variants"][name] or {})
    return resolve_roles(entry["model"], spec)


def encode_cycle(
    champion: Release | None,
    window: pd.DataFrame,
    holdout: pd.DataFrame,
    cycle: dict[str, Any],
    features: dict[str, Any],
    domains: dict[str, Any],
    retrain: dict[str, Any],
) -> tuple[dict[str, pd.DataFrame], dict[str, Any], dict[str, Any]]:
    """Encode the window and the holdout for the challengers (and the holdout for the
    champion, with its own encoders and item lists).

    With a champion and ``vocabulary: champion`` the champion's encoders are reused;
    otherwise (the first cycle, or ``vocabulary: rolling``) the feature vocabularies are
    refitted on the window's training partitions. Domains stay the champion's (their
    ids are what per-domain parameters are indexed by). Item-level lists always come
    from the window's training rows.

    Returns:
        ``{"train", "valid", "holdout", "holdout_champion"}`` model inputs, the
        challengers' encoders (``feature_encoder``, ``domain_encoder``,
        ``feature_spec``, ``item_lists``) and the encoding report (unseen values per
        field and split, and whether the vocabularies were refitted).
    """
    train_rows = window[window[PARTITION_COLUMN] != cycle["valid"]]
    valid_rows = window[window[PARTITION_COLUMN] == cycle["valid"]]
    refit = champion is None or retrain.get("vocabulary", "champion") == "rolling"
    if refit:
        feature_encoder, base_spec = fit_encoder(train_rows, cycle["schema"], features["encoder"], features.get("roles"))
        domain_encoder = fit_domains(train_rows, domains) if champion is None else champion["domain_encoder"]
        feature_spec = spec_with_domain(base_spec, DomainEncoder.from_dict(domain_encoder))
    else:
        feature_encoder, domain_encoder, feature_spec = champion["feature_encoder"], champion["domain_encoder"], champion["feature_spec"]
    schema = FeatureEncoder.from_dict(feature_encoder).schema
    item_lists = item_list_lookup(train_rows, schema)
    inputs, report = {}, {"vocabulary": "refitted" if refit else "champion", "splits": {}}
    for split, rows in (("train", train_rows), ("valid", valid_rows), ("holdout", holdout)):
        inputs[split], stats = encode_rows(rows, feature_encoder, domain_encoder, item_lists)
        report["splits"][split] = {"rows": len(rows), "oov_rows": {k: v["oov_rows"] for k, v in stats.items()}}
    if champion is not None:
        inputs["holdout_champion"], stats = encode_rows(holdout, champion["feature_encoder"], champion["domain_encoder"], champion["item_lists"])
        report["splits"]["holdout_champion"] = {"rows": len(holdout), "oov_rows": {k: v["oov_rows"] for k, v in stats.items()}}
    encoders = {"feature_encoder": feature_encoder, "domain_encoder": domain_encoder, "feature_spec": feature_spec, "item_lists": item_lists}
    return inputs, encoders, report


# ---------------------------------------------------------------- training


def _schedule(training: dict[str, Any], retrain: dict[str, Any], key: str) -> tuple[dict[str, Any], int]:
    """The TrainConfig of a challenger (``training.train`` with ``retrain.<key>.train``
    over it) and its epochs (0 = keep the starting weights, e.g. to test a cycle)."""
    config = {**training["train"], **(retrain.get(key) or {}).get("train", {}), "seed": int(retrain.get("seed", 2024))}
    epochs = int(config["max_epochs"])
    if epochs < 0:
        raise RetrainError(f"retrain.{key}.train.max_epochs={epochs} must be >= 0")
    return config, epochs


def _fit(model: nn.Module, config: dict[str, Any], epochs: int, train_data: Any, valid_data: Any, checkpoint_dir: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (CPU, eval) and its training record, with its validation AUC
    (what picks the cycle's candidate)."""
    if epochs == 0:
        model = model.to(train_data.device)
        val_auc = auc(valid_data.y, evaluate(model, valid_data))
        return model.to("cpu").eval(), {"epochs_run": 0, "history": [], "resumed_from_epoch": 0, "val_auc": val_auc}
    result = train(model, train_data, valid_data, TrainConfig.from_dict(config), checkpoint_dir=checkpoint_dir)
    return result.model.to("cpu").eval(), {
        "epochs_run": len(result.history), "history": result.history, "resumed_from_epoch": result.resumed_from_epoch, "val_auc": result.best_val_auc,
    }


def _variant_name(variant: dict[str, Any]) -> str:
    return f"{variant['suite']}.{variant['name']}"


def train_challengers(
    champion: Release | None,
    inputs: dict[str, pd.DataFrame],
    encoders: dict[str, Any],
    cycle: dict[str, Any],
    training: dict[str, Any],
    parameters: dict[str, Any],
    retrain: dict[str, Any],
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train the cycle's challengers on the window, for each of ``retrain.variants``:

    - ``warm:<suite>.<variant>`` (unless ``retrain.warm_start.enabled`` is false; the
      champion's own variant always among them), started from the champion and trained
      on ``retrain.warm_start.train``. The champion's own variant starts from all its
      weights (its config as trained); any
      other variant from those of the champion's tensors that have the same name and
      shape (the field embeddings, typically), the rest as initialised. With refitted
      vocabularies, the embedding rows of values both vocabularies hold are carried
      over and new values start fresh.
    - ``cold:<suite>.<variant>``, built fresh from the training seed and trained on
      ``retrain.cold_start.train``: always in the first cycle (there is no champion to
      start from), otherwise when ``retrain.cold_start.enabled``.

    Returns:
        ``{name: model}`` (CPU, eval mode) and a record of each one's training (its
        epochs, history, best validation AUC, the tensors taken from the champion).
    """
    spec = FeatureSpec.from_dict(encoders["feature_spec"])
    suites = {name: parameters[name] for name in SUITES if name in parameters}
    # resolved and built before any training: a bad variant stops the cycle here
    configs = {_variant_name(v): _variant_model(suites, v, spec) for v in retrain["variants"]}
    for config in configs.values():
        build_model(config, spec)
    device = resolve_device(training.get("device", "auto"))
    # Each challenger's resume state: a cycle killed mid-training continues from the last
    # completed epoch when it is run again (training.resume); removed once all are done.
    root = Path(retrain["checkpoint_dir"]) / cycle["holdout"] if retrain.get("checkpoint_dir") else None
    train_data = frame_to_tensors(inputs["train"], spec, device)
    valid_data = frame_to_tensors(inputs["valid"], spec, device)
    starts: dict[str, tuple[nn.Module, str, dict[str, Any]]] = {}  # name -> (model, schedule, record)
    if champion is not None and (retrain.get("warm_start") or {}).get("enabled", True):
        own = _variant_name(champion["meta"]["variant"])
        refitted = encoders["feature_encoder"] is not champion["feature_encoder"]
        row_maps = _row_maps(champion["feature_encoder"], encoders["feature_encoder"], spec) if refitted else None
        for name, config in {own: champion["model"].config, **configs}.items():  # the champion's own variant always
            same = name == own
            model = build_model(champion["model"].config if same else config, spec)
            taken = carry_over_embeddings(champion["model"], model, row_maps, strict=same)
            starts[f"warm:{name}"] = (model, "warm_start", {"start": "champion", "champion_model_id": champion["meta"].get("model_id"),
                                                             "tensors_from_champion": f"{len(taken)} of {len(model.state_dict())}"})
    if champion is None or (retrain.get("cold_start") or {}).get("enabled", False):
        seed = int(retrain.get("seed", 2024))
        for name, config in configs.items():
            starts[f"cold:{name}"] = (build_model({**config, "seed": seed}, spec), "cold_start", {"start": "scratch"})
    challengers: dict[str, nn.Module] = {}
    record: dict[str, Any] = {}
    for name, (model, schedule, info) in starts.items():
        config, epochs = _schedule(training, retrain, schedule)
        seed_everything(config["seed"])
        challengers[name], fitted = _fit(model, config, epochs, train_data, valid_data, root and root / name.replace(":", "-"))
        record[name] = {**info, **fitted}
    remove_state(root)
    return challengers, record


def _row_maps(old_encoder: dict[str, Any], new_encoder: dict[str, Any], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Per field, ``old_row[new_index]``: the champion's index of each value of the new
    vocabulary (-1 for a new value). Numeric fields whose bucket edges changed map
    nothing (a bucket id then means another range)."""
    old = {f["name"]: f for f in old_encoder["fields"]}
    maps = {}
    for f in new_encoder["fields"]:
        before = old.get(f["name"])
        size = len(f["vocab"]) + 2
        if before is None or before.get("edges") != f.get("edges"):
            maps[f["name"]] = np.r_[0, 1, np.full(size - 2, -1)]
            continue
        where = {_key(v): i + 2 for i, v in enumerate(before["vocab"])}
        maps[f["name"]] = np.r_[0, 1, [where.get(_key(v), -1) for v in f["vocab"]]].astype(np.int64)
    if spec.domain_field:  # domains are the champion's: the identity
        size = next(f.vocab_size for f in spec.fields if f.name == spec.domain_field)
        maps[spec.domain_field] = np.arange(size)
    return maps


def _key(value: Any) -> str:
    return repr(value)


# ---------------------------------------------------------------- evaluation and promotion


def _code_version() -> dict[str, Any]:
    out: dict[str, Any] = {"package": dynamic_ctr.__version__}
    try:
        root = Path(__file__).resolve().parents[4]
        out["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=True).stdout
        out["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None  # not a git checkout (an installed package)
    return out


def _holdout_scores(model: nn.Module, frame: pd.DataFrame, spec: FeatureSpec) -> tuple[np.ndarray, dict[str, Any]]:
    p = evaluate(model, frame_to_tensors(frame, spec, "cpu"))
    y = frame[spec.label].to_numpy()
    metrics = score_metrics(y, p, frame, spec)
    return p, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def decide(
    champion: Release | None,
    challengers: dict[str, nn.Module],
    inputs: dict[str, pd.DataFrame],
    encoders: dict[str, Any],
    cycle: dict[str, Any],
    encoding: dict[str, Any],
    training_record: dict[str, Any],
    retrain: dict[str, Any],
) -> dict[str, Any]:
    """Score champion and challengers on the holdout and decide the promotion.

    The candidate is the challenger with the best validation AUC (chosen before the
    holdout is looked at, so the holdout test is not a maximum over challengers). It
    is promoted when ``AUC(candidate) - AUC(champion) > promotion.margin`` on the
    holdout and the paired DeLong test of the two there gives ``p < promotion.alpha``.
    With no champion (the first cycle) the candidate becomes the champion
    (``decision: bootstrap``). Every challenger's holdout metrics and test are recorded.

    Returns:
        The promotion record: decision and reason, every model's metrics, the tests,
        the thresholds, the partitions (files and SHA-256), the champion version, the
        code version, the encoding report and the training record.
    """
    spec = FeatureSpec.from_dict(encoders["feature_spec"])
    y = inputs["holdout"][spec.label].to_numpy()
    scores, metrics = {}, {}
    for name, model in challengers.items():
        scores[name], metrics[name] = _holdout_scores(model, inputs["holdout"], spec)
        metrics[name]["parameters"] = count_parameters(model)
    promotion = retrain["promotion"]
    record: dict[str, Any] = {
        "cycle": {k: cycle[k] for k in ("holdout", "train", "valid", "bootstrap", "started_at", "partitions", "champion")},
        "thresholds": {"margin": float(promotion["margin"]), "alpha": float(promotion["alpha"])},
        "code": _code_version(),
        "encoding": encoding,
        "training": training_record,
        "metrics": metrics,
        "tests": {},
    }
    candidate = max(challengers, key=lambda n: training_record[n]["val_auc"])
    record["candidate"] = candidate
    if champion is None:
        return {**record, "decision": "bootstrap", "promoted": candidate,
                "reason": f"no champion yet: the challenger with the best validation AUC, {candidate!r}, becomes the champion"}
    champion_spec = FeatureSpec.from_dict(champion["feature_spec"])
    champion_scores, metrics["champion"] = _holdout_scores(champion["model"], inputs["holdout_champion"], champion_spec)
    for name in challengers:
        test = delong_test(y, scores[name], champion_scores)
        record["tests"][name] = {"auc_challenger": test.auc_a, "auc_champion": test.auc_b, "delta": test.delta, "se": test.se, "z": test.z, "p_value": test.p_value}
    test = record["tests"][candidate]
    won = test["delta"] > promotion["margin"] and test["p_value"] < promotion["alpha"]
    reason = (
        f"candidate {candidate!r} (best validation AUC): holdout AUC {test['auc_challenger']:.4f} vs champion {test['auc_champion']:.4f} "
        f"(delta {test['delta']:+.4f}, DeLong p={test['p_value']:.3g}); promotion needs delta > {promotion['margin']} and p < {promotion['alpha']}"
    )
    return {**record, "decision": "promoted" if won else "kept", "promoted": candidate if won else None, "reason": reason}


def _model_id(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _variant_of(challenger: str, retrain: dict[str, Any]) -> dict[str, Any]:
    """``{suite, name}`` of a challenger named ``warm:<suite>.<name>`` or ``cold:...``."""
    suite, name = challenger.split(":", 1)[1].split(".", 1)
    return {"suite": suite, "name": name}


def _history_entry(record: dict[str, Any], model_id: str) -> dict[str, Any]:
    metrics = record["metrics"]
    holder = "champion" if record["promoted"] is None else record["promoted"]
    return {
        "cycle": record["cycle"]["holdout"],
        "decision": record["decision"],
        "champion_model_id": model_id,
        "champion_auc": metrics[holder]["auc"],
        "challenger_auc": {n: m["auc"] for n, m in metrics.items() if n != "champion"},
        "previous_champion_auc": metrics.get("champion", {}).get("auc"),
    }


def crown(champion: Release | None, challengers: dict[str, nn.Module], encoders: dict[str, Any], record: dict[str, Any], retrain: dict[str, Any]) -> Release:
    """The champion after this cycle, as a new release version: the promoted challenger
    with its encoders, or the champion as it was. Its ``meta.history`` carries one
    entry per cycle (the AUC trend)."""
    history = list(champion["meta"].get("history", [])) if champion is not None else []
    if record["promoted"] is None:
        assert champion is not None
        release: Release = {**champion, "meta": dict(champion["meta"])}  # type: ignore[typeddict-item]
    else:
        model = challengers[record["promoted"]]
        release = {
            "model": model,
            **{k: encoders[k] for k in ("feature_encoder", "domain_encoder", "feature_spec", "item_lists")},  # type: ignore[typeddict-item]
            "meta": {
                "model_id": _model_id(model),
                "variant": _variant_of(record["promoted"], retrain),
                "start": record["promoted"].split(":", 1)[0],
                "trained_in_cycle": record["cycle"]["holdout"],
                "trained_on": [*record["cycle"]["train"], record["cycle"]["valid"]],
            },
        }
    release["meta"]["history"] = [*history, _history_entry(record, release["meta"]["model_id"])]
    logger.info("retrain cycle %s: %s. %s", record["cycle"]["holdout"], record["decision"], record["reason"])
    return release


# ---------------------------------------------------------------- drift


def drift_report(
    champion: Release | None, window: pd.DataFrame, holdout: pd.DataFrame, new_champion: Release, record: dict[str, Any]
) -> tuple[pd.DataFrame, plt.Figure, str]:
    """The new partition against the training window, through the encoders the champion
    served with this cycle (the new one's in the first cycle): OOV share, label rate and
    PSI per field; and the champion's holdout AUC over the cycles.

    Returns:
        The drift table, the AUC-trend figure and the HTML report.
    """
    served = champion if champion is not None else new_champion
    window_in, _ = encode_rows(window, served["feature_encoder"], served["domain_encoder"], served["item_lists"])
    holdout_in, _ = encode_rows(holdout, served["feature_encoder"], served["domain_encoder"], served["item_lists"])
    table = drift_table(window_in, holdout_in, FeatureSpec.from_dict(served["feature_spec"]))
    table.insert(0, "partition", record["cycle"]["holdout"])

    history = pd.DataFrame(new_champion["meta"]["history"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(history["cycle"], history["champion_auc"], marker="o", label="champion after the cycle")
    previous = history["previous_champion_auc"].astype("float64")
    ax.plot(history["cycle"], previous, marker="x", linestyle=":", label="champion before the cycle")
    for i, row in history.iterrows():
        ax.annotate(row["decision"], (i, row["champion_auc"]), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.set_xlabel("holdout partition (cycle)")
    ax.set_ylabel("holdout AUC")
    ax.set_title("Champion AUC per retraining cycle")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()

    cycle = record["cycle"]
    page = "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'><title>dynamic-ctr retraining</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style></head><body>",
        f"<h1>Retraining cycle {cycle['holdout']}</h1>",
        f"<p>Decision: <b>{record['decision']}</b>. {record['reason']}</p>",
        f"<p>Trained on {cycle['train'][0]} .. {cycle['train'][-1]}, validated on {cycle['valid']}, scored on {cycle['holdout']}.</p>",
        "<h2>Holdout metrics</h2>", pd.DataFrame(record["metrics"]).T.to_html(float_format="%.4f"),
        "<h2>Champion AUC over the cycles</h2>", figure_html(fig),
        "<h2>Drift of the new partition against the training window</h2>",
        "<p>OOV share: rows holding a value the serving encoder never saw. PSI &lt; 0.1 stable, 0.1-0.25 moderate, &gt; 0.25 a shift worth a look.</p>",
        table.to_html(index=False, float_format="%.4f", na_rep=""),
        "</body></html>",
    ])
    return table, fig, page


# ---------------------------------------------------------------- rollback


def roll_back(target: Release, current: Release) -> tuple[Release, dict[str, Any]]:
    """Make ``target`` (an earlier champion version, chosen with ``--load-versions
    retrain.rollback_target:<version>``) the champion again, as a new version; the
    history keeps every cycle and records the rollback.

    Raises:
        RetrainError: ``target`` is the current champion (no version was chosen).
    """
    if target["meta"].get("version") == current["meta"].get("version"):
        raise RetrainError(
            f"retrain.rollback_target resolves to the current champion {current['meta'].get('version')}; "
            "choose an earlier one: kedro run --pipeline rollback --load-versions retrain.rollback_target:<version>"
        )
    entry = {
        "cycle": f"rollback to {target['meta'].get('version')}",
        "decision": "rolled_back",
        "champion_model_id": target["meta"].get("model_id"),
        "champion_auc": (target["meta"].get("history") or [{}])[-1].get("champion_auc"),
        "challenger_auc": {},
        "previous_champion_auc": (current["meta"].get("history") or [{}])[-1].get("champion_auc"),
    }
    release: Release = {**target, "meta": {**target["meta"], "history": [*current["meta"].get("history", []), entry], "rolled_back_from": current["meta"].get("version")}}  # type: ignore[typeddict-item]
    record = {
        "decision": "rolled_back",
        "from": {k: current["meta"].get(k) for k in ("version", "model_id", "trained_in_cycle")},
        "to": {k: target["meta"].get(k) for k in ("version", "model_id", "trained_in_cycle")},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": _code_version(),
    }
    return release, record


__all__ = [
    "RetrainError", "crown", "decide", "drift_report", "encode_cycle", "load_cycle", "partition_log", "roll_back", "train_challengers",
]
