"""Scoring: new raw data -> the same adapter -> a release's encoders and model.

A release (``io.release``) bundles a model with the encoders and item-level lists it was
trained with: the retraining cycle's champion is one; :func:`suite_release` makes one of
a suite's deployed model and the main run's encoders.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import nn

from dynamic_ctr.data.adapters import get_adapter
from dynamic_ctr.data.encoder import FeatureEncoder, item_list_lookup
from dynamic_ctr.data.raw import RawTable
from dynamic_ctr.io.release import Release
from dynamic_ctr.pipelines.domains.nodes import encode_rows
from dynamic_ctr.pipelines.training.nodes import frame_to_tensors
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.metrics import evaluate


def suite_release(
    primary_train: pd.DataFrame,
    feature_encoder: dict[str, Any],
    domain_encoder: dict[str, Any],
    feature_spec: dict[str, Any],
    deployed: dict[str, nn.Module],
) -> Release:
    """A suite's deployed model with the main run's encoders, as a release; its item
    lists are aggregated from the main run's training split."""
    schema = FeatureEncoder.from_dict(feature_encoder).schema
    return {
        "model": next(iter(deployed.values())),
        "feature_encoder": feature_encoder,
        "domain_encoder": domain_encoder,
        "feature_spec": feature_spec,
        "item_lists": item_list_lookup(primary_train, schema),
        "meta": {"source": "suite deployed model"},
    }


def score(raw_source: dict[str, RawTable | None], ingestion: dict[str, Any], release: Release) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Click probabilities for every row of a new raw file.

    The file goes through the training run's adapter (``params:ingestion``) and is
    encoded by the release's own encoders and item lists, so a row is encoded exactly
    as it would have been in training.

    Returns:
        One prediction per kept input row (the schema's key columns, ``source_line``,
        ``probability``), the rows that could not be scored (file, line, reason) and a
        report counting both, plus values unseen in training per field.
    """
    result = get_adapter(ingestion["adapter"])(raw_source, dict(ingestion.get("options") or {}))
    table = result.table
    encoded, stats = encode_rows(table, release["feature_encoder"], release["domain_encoder"], release["item_lists"])
    spec = FeatureSpec.from_dict(release["feature_spec"])
    probability = evaluate(release["model"], frame_to_tensors(encoded, spec, "cpu"))

    keys = [c for c in (*result.schema.key_columns, "source_line") if c in table.columns]
    predictions = table[list(dict.fromkeys(keys))].reset_index(drop=True).copy()
    predictions["probability"] = probability
    not_scored = result.quarantine.frame()
    main = next(r for r in raw_source.values() if r is not None and r.path == result.main_file)
    report = {
        "file": result.main_file,
        "model": {k: v for k, v in release["meta"].items() if k in ("source", "variant", "model_id", "version", "trained_in_cycle")},
        "rows_read": main.rows_read,
        "rows_scored": len(predictions),
        "rows_not_scored": result.quarantine.total(result.main_file),
        "not_scored_by_reason": result.quarantine.counts(result.main_file),
        "unseen_values_per_field": {k: v["oov_rows"] for k, v in stats.items()},
    }
    return predictions, not_scored, report
