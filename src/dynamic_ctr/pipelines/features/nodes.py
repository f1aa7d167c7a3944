"""Feature nodes: split, item-level aggregation, encoder fitting and encoding."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.data.split import SplitParams, split_frame


def split_interactions(
    interactions: pd.DataFrame, table_schema: dict[str, Any], ingestion_check: dict[str, Any], params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Split the clean table (seeded), then aggregate item-level lists on training rows.

    ``ingestion_check`` is the ingestion gate's verdict: the split waits for it, and
    refuses a table that did not pass.

    Returns the train, validation and test tables and a summary of the split.
    """
    if not ingestion_check.get("passed"):
        raise ValueError(f"the clean table did not pass the ingestion check: {ingestion_check}")
    schema = TableSchema.from_dict(table_schema)
    split = SplitParams.from_dict(params)
    train, valid, test = split_frame(interactions, split, schema.time_key, schema.key_columns)
    train, (valid, test), notes = aggregate_item_lists(train, [valid, test], schema)
    summary = {
        "method": split.method,
        "seed": split.seed,
        "rows": {"train": len(train), "valid": len(valid), "test": len(test)},
        "positive_rate": {n: float(f["label"].astype("float64").mean()) for n, f in (("train", train), ("valid", valid), ("test", test))},
        **notes,
    }
    return train, valid, test, summary


ROLE_PARAMS = ("user", "item", "context")


def fit_encoder(
    train: pd.DataFrame, table_schema: dict[str, Any], params: dict[str, Any], roles: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit vocabularies and buckets on the training split only.

    ``roles`` (``features.roles``) maps the field roles ``user``, ``item`` and
    ``context`` to fields; user and item default to the adapter's keys.

    Returns the encoder (JSON) and the feature spec models build their embeddings from.
    """
    encoder = FeatureEncoder.fit(train, TableSchema.from_dict(table_schema), EncoderParams(**params))
    return encoder.to_dict(), spec_with_roles(encoder.feature_spec().to_dict(), roles)


def spec_with_roles(spec: dict[str, Any], roles: dict[str, Any] | None) -> dict[str, Any]:
    """The encoder's feature spec with the ``features.roles`` fields set (checked)."""
    roles = dict(roles or {})
    unknown = set(roles) - set(ROLE_PARAMS)
    if unknown:
        raise ValueError(f"features.roles has unknown role(s) {sorted(unknown)}; known: {list(ROLE_PARAMS)}")
    names = [f["name"] for f in spec["fields"]]
    for role, field in roles.items():
        if field is not None and field not in names:
            raise ValueError(f"features.roles.{role}={field!r} is not a field of this data set; fields: {names}")
        spec[f"{role}_field"] = field
    return spec


def encode_splits(
    encoder: dict[str, Any], train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Encode the three splits; report unseen values (OOV) and truncated lists per field."""
    fitted = FeatureEncoder.from_dict(encoder)
    report: dict[str, Any] = {}
    out = []
    for name, frame in (("train", train), ("valid", valid), ("test", test)):
        encoded, stats = fitted.transform(frame, passthrough=("source_line",))
        report[name] = {"rows": len(encoded), "fields": stats}
        out.append(encoded)
    return out[0], out[1], out[2], report
