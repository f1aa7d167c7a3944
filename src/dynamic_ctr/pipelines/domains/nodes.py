"""Domain nodes: domain ids, per-domain statistics and activity groups."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamic_ctr.data.domains import DomainEncoder, DomainParams, domain_table, frequency_groups
from dynamic_ctr.data.encoder import FeatureEncoder
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
        return pd.DataFrame({"key": pd.Series(dtype="str"), "key_index": pd.Series(dtype="int32"),
                             "interactions": pd.Series(dtype="int64"), "group": pd.Series(dtype="int8")})
    table = frequency_groups(train, key, settings.frequency_groups)
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
        ids = domains.transform(primary)
        frame = encoded.assign(**{DOMAIN_FIELD: ids})
        if key is not None:
            frame[GROUP_COLUMN] = primary[key].astype(str).map(group_of).fillna(-1).to_numpy(dtype=np.int8)
        else:
            frame[GROUP_COLUMN] = np.full(len(frame), -1, dtype=np.int8)
        outputs.append(frame)
        stats[split] = (ids, frame["label"].to_numpy())
    spec = FeatureSpec.from_dict(base_spec).with_field(
        FieldSpec(name=DOMAIN_FIELD, kind="categorical", vocab_size=domains.vocab_size, source="domain"),
        domain_field=DOMAIN_FIELD,
    )
    spec_dict = spec.to_dict()
    spec_dict["metadata"] = {"domain_names": domains.names, "frequency_key": key, "frequency_group_column": GROUP_COLUMN}
    return outputs[0], outputs[1], outputs[2], spec_dict, domain_table(stats, domains.names)
