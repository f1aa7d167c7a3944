"""Domain nodes: domain ids, per-domain statistics and activity groups."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamic_ctr.data.domains import DomainEncoder, DomainParams, domain_table, frequency_groups
from dynamic_ctr.data.encoder import FeatureEncoder, ItemLists, apply_item_lists
from dynamic_ctr.spec import FeatureSpec, FieldSpec

DOMAIN_FIELD = "domain"
GROUP_COLUMN = "frequency_group"


def fit_domains(train: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """Domains of the training split; rare ones merged under ``min_support``."""
    return DomainEncoder.fit(train, DomainParams.from_dict(params)).to_dict()


def fit_frequency_groups(train: pd.DataFrame, encoder: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Activity groups of ``frequency_key`` (e.g. users) on the training split.

    Returns ``key`` (raw value), ``key_index`` (its encoded index), ``interactions``
    and ``group``; empty when no ``frequency_key`` is set.
    """
    settings = DomainParams.from_dict(params)
    key = settings.frequency_key
    if key is None:
        return no_frequency_groups()
    return with_key_index(frequency_groups(train, key, settings.frequency_groups), encoder, key)


def no_frequency_groups() -> pd.DataFrame:
    """The activity-group table when no ``frequency_key`` is set: its columns, no row."""
    return pd.DataFrame({"key": pd.Series(dtype="str"), "key_index": pd.Series(dtype="int32"),
                         "interactions": pd.Series(dtype="int64"), "group": pd.Series(dtype="int8")})


def with_key_index(table: pd.DataFrame, encoder: dict[str, Any], key: str) -> pd.DataFrame:
    """The activity-group table with each key's encoded index."""
    field = FeatureEncoder.from_dict(encoder).field(key)
    table.insert(1, "key_index", field.indices(pa.array(table["key"].tolist())))
    table["key"] = table["key"].astype(str)
    return table


def assign_domains(
    domain_encoder: dict[str, Any],
    base_spec: dict[str, Any],
    groups: pd.DataFrame,
    params: dict[str, Any],
    primary_train: pd.DataFrame,
    primary_valid: pd.DataFrame,
    primary_test: pd.DataFrame,
    encoded_train: pd.DataFrame,
    encoded_valid: pd.DataFrame,
    encoded_test: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Add the ``domain`` field and the ``frequency_group`` column to the encoded splits.

    Returns the model inputs (train, valid, test), the feature spec with the domain
    field, and samples/clicks/CTR per domain and split.
    """
    domains = DomainEncoder.from_dict(domain_encoder)
    key = DomainParams.from_dict(params).frequency_key
    group_of = dict(zip(groups["key"], groups["group"])) if key is not None else {}
    outputs, stats = [], {}
    for split, primary, encoded in (("train", primary_train, encoded_train), ("valid", primary_valid, encoded_valid), ("test", primary_test, encoded_test)):
        if len(primary) != len(encoded):
            raise ValueError(f"{split}: primary split has {len(primary)} rows but the encoded one {len(encoded)}")
        frame = with_domain_columns(encoded, primary, domains, key, group_of)
        outputs.append(frame)
        stats[split] = (frame[DOMAIN_FIELD].to_numpy(), frame["label"].to_numpy())
    spec_dict = model_feature_spec(base_spec, domains, key)
    return outputs[0], outputs[1], outputs[2], spec_dict, domain_table(stats, domains.names)


def with_domain_columns(encoded: pd.DataFrame, primary: pd.DataFrame, domains: DomainEncoder, key: str | None, group_of: dict) -> pd.DataFrame:
    """``encoded`` plus the ``domain`` field and the ``frequency_group`` column of ``primary``'s rows."""
    frame = encoded.assign(**{DOMAIN_FIELD: domains.transform(primary)})
    if key is not None:
        frame[GROUP_COLUMN] = primary[key].astype(str).map(group_of).fillna(-1).to_numpy(dtype=np.int8)
    else:
        frame[GROUP_COLUMN] = np.full(len(frame), -1, dtype=np.int8)
    return frame


def model_feature_spec(base_spec: dict[str, Any], domains: DomainEncoder, key: str | None) -> dict[str, Any]:
    """The models' feature spec: the encoder's, the domain field, the activity groups."""
    spec_dict = spec_with_domain(base_spec, domains)
    spec_dict["metadata"] = {**spec_dict["metadata"], "frequency_key": key, "frequency_group_column": GROUP_COLUMN}
    return spec_dict


def spec_with_domain(base_spec: dict[str, Any], domains: DomainEncoder) -> dict[str, Any]:
    """The encoder's feature spec plus the ``domain`` field (and the domain names)."""
    spec = FeatureSpec.from_dict(base_spec).with_field(
        FieldSpec(name=DOMAIN_FIELD, kind="categorical", vocab_size=domains.vocab_size, source="domain"),
        domain_field=DOMAIN_FIELD,
    )
    out = spec.to_dict()
    return {**out, "metadata": {**(out.get("metadata") or {}), "domain_names": domains.names}}


def encode_rows(
    table: pd.DataFrame, feature_encoder: dict[str, Any], domain_encoder: dict[str, Any], item_lists: ItemLists, passthrough: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Encode clean rows exactly as a trained model's inputs were: its item-level lists,
    its feature encoder, its domains. Returns the model input and, per field, the rows
    holding a value the encoder never saw (``oov_rows``)."""
    encoder = FeatureEncoder.from_dict(feature_encoder)
    if encoder.schema.item_aggregated:
        table = apply_item_lists(table, item_lists, encoder.schema)
    encoded, stats = encoder.transform(table, passthrough=passthrough)
    encoded[DOMAIN_FIELD] = DomainEncoder.from_dict(domain_encoder).transform(table)
    return encoded, stats
