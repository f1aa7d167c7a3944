"""Scoring: new raw data -> the same adapter and saved encoders -> the deployed model."""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import nn

from dynamic_ctr.data.adapters import get_adapter
from dynamic_ctr.data.domains import DomainEncoder
from dynamic_ctr.data.encoder import FeatureEncoder, aggregate_item_lists
from dynamic_ctr.data.raw import RawTable
from dynamic_ctr.pipelines.domains.nodes import DOMAIN_FIELD
from dynamic_ctr.pipelines.training.nodes import frame_to_tensors
from dynamic_ctr.spec import FeatureSpec
from dynamic_ctr.training.metrics import evaluate


def score(
    raw_source: dict[str, RawTable | None],
    ingestion: dict[str, Any],
    primary_train: pd.DataFrame,
    feature_encoder: dict[str, Any],
    domain_encoder: dict[str, Any],
    feature_spec: dict[str, Any],
    deployed: dict[str, nn.Module],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Click probabilities for every row of a new raw file.

    The file goes through the training run's adapter (``params:ingestion``), its
    item-level lists are aggregated from the *training* split, and it is encoded by the
    saved encoders, so a row is encoded exactly as it would have been in training.

    Returns:
        One prediction per kept input row (the schema's key columns, ``source_line``,
        ``probability``), the rows that could not be scored (file, line, reason) and a
        report counting both, plus values unseen in training per field.
    """
    result = get_adapter(ingestion["adapter"])(raw_source, dict(ingestion.get("options") or {}))
    encoder = FeatureEncoder.from_dict(feature_encoder)
    schema = encoder.schema
    table = result.table
    if schema.item_aggregated:
        _, (table,), _ = aggregate_item_lists(primary_train, [table], schema)
    encoded, stats = encoder.transform(table)
    encoded[DOMAIN_FIELD] = DomainEncoder.from_dict(domain_encoder).transform(table)
    spec = FeatureSpec.from_dict(feature_spec)
    model = next(iter(deployed.values()))
    probability = evaluate(model, frame_to_tensors(encoded, spec, "cpu"))

    keys = [c for c in (*schema.key_columns, "source_line") if c in table.columns]
    predictions = table[list(dict.fromkeys(keys))].reset_index(drop=True).copy()
    predictions["probability"] = probability
    not_scored = result.quarantine.frame()
    main = next(r for r in raw_source.values() if r is not None and r.path == result.main_file)
    report = {
        "file": result.main_file,
        "rows_read": main.rows_read,
        "rows_scored": len(predictions),
        "rows_not_scored": result.quarantine.total(result.main_file),
        "not_scored_by_reason": result.quarantine.counts(result.main_file),
        "unseen_values_per_field": {k: v["oov_rows"] for k, v in stats.items()},
    }
    return predictions, not_scored, report
