"""The feature encoder on the real MovieLens latest-small splits: vocabularies and
buckets fitted on the training split only, stable when saved and read back.

Index convention (``dynamic_ctr.spec``): 0 padding, 1 out-of-vocabulary, values from 2.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, FieldEncoder, aggregate_item_lists
from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.data.split import SplitParams, split_frame
from dynamic_ctr.spec import FIRST_VALUE_INDEX, OOV_INDEX, PAD_INDEX

LEAK_TAG = "__tag_given_only_in_a_test_row__"


@pytest.fixture(scope="module")
def raw_splits(latest_table):
    """Random 70/10/20 split of the real table (seed 2024), before item aggregation."""
    return split_frame(latest_table, SplitParams(), "timestamp")


@pytest.fixture(scope="module")
def splits(raw_splits, latest_result):
    train, (valid, test), _ = aggregate_item_lists(raw_splits[0], list(raw_splits[1:]), latest_result.schema)
    return train, valid, test


@pytest.fixture(scope="module")
def params(conf) -> EncoderParams:
    return EncoderParams(**conf.params("base", "features")["encoder"])


@pytest.fixture(scope="module")
def encoder(splits, latest_result, params) -> FeatureEncoder:
    return FeatureEncoder.fit(splits[0], latest_result.schema, params)


def _index_of(enc: FieldEncoder) -> dict:
    return {v: i + FIRST_VALUE_INDEX for i, v in enumerate(enc.vocab)}


# ------------------------------------------------------------------ leakage and min_count


def test_values_only_in_valid_or_test_are_oov(splits, encoder):
    train, valid, test = splits
    train_items = set(train["item"].tolist())
    assert set(encoder.field("item").vocab) == train_items
    index = _index_of(encoder.field("item"))
    for frame in (valid, test):
        items = frame["item"].tolist()
        unseen = [i not in train_items for i in items]
        assert sum(unseen) > 0  # the real split does leave items out of training
        encoded, stats = encoder.transform(frame)
        expected = [OOV_INDEX if u else index[i] for i, u in zip(items, unseen)]
        assert encoded["item"].tolist() == expected
        assert stats["item"]["oov_rows"] == sum(unseen)
        assert stats["user"]["oov_rows"] == sum(u not in set(train["user"]) for u in frame["user"])
    # A value never seen anywhere is OOV too, whatever the field.
    strange = test.head(5).assign(
        user=pd.array([10**9] * 5, dtype="int64[pyarrow]"),
        genres=pd.array([["Never-A-Genre", "Comedy"]] * 5, dtype=pd.ArrowDtype(pa.list_(pa.string()))),
    )
    encoded, stats = encoder.transform(strange)
    assert encoded["user"].tolist() == [OOV_INDEX] * 5 and stats["user"]["oov_rows"] == 5
    comedy = _index_of(encoder.field("genres"))["Comedy"]
    assert encoded[["genres__0", "genres__1", "genres__2"]].values.tolist() == [[OOV_INDEX, comedy, PAD_INDEX]] * 5
    assert stats["genres"]["oov_rows"] == 5


def test_vocabulary_order_and_missing_value(splits, encoder):
    train = splits[0]
    counts = Counter(train["item"].tolist())
    vocab = encoder.field("item").vocab
    assert vocab[0] == counts.most_common(1)[0][0]  # index 2 = the most frequent item
    assert [counts[v] for v in vocab] == sorted((counts[v] for v in vocab), reverse=True)
    for a, b in zip(vocab, vocab[1:]):
        if counts[a] == counts[b]:
            assert str(a) < str(b)  # ties by the value's text: reproducible
    # Titles without a year: a missing year is a value of its own, not OOV.
    assert train["year"].isna().any()
    assert None in encoder.field("year").vocab
    encoded, stats = encoder.transform(train)
    missing_index = encoder.field("year").vocab.index(None) + FIRST_VALUE_INDEX
    assert set(encoded.loc[train["year"].isna().to_numpy(), "year"]) == {missing_index}
    assert stats["year"]["oov_rows"] == 0


def test_min_count_per_field(splits, latest_result, params):
    train, _, test = splits
    params3 = replace(params, min_count=2, min_count_per_field={"item": 3})
    enc = FeatureEncoder.fit(train, latest_result.schema, params3)
    item_counts = Counter(train["item"].tolist())
    assert set(enc.field("item").vocab) == {i for i, n in item_counts.items() if n >= 3}
    assert set(enc.field("user").vocab) == {u for u, n in Counter(train["user"].tolist()).items() if n >= 2}
    tag_counts = Counter(t for tags in train["tags"].tolist() for t in tags)
    assert set(enc.field("tags").vocab) == {t for t, n in tag_counts.items() if n >= 2}
    assert any(n == 1 for n in tag_counts.values())  # so the threshold removes something
    encoded, stats = enc.transform(test)
    rare = np.array([item_counts.get(i, 0) < 3 for i in test["item"].tolist()])
    assert (encoded["item"].to_numpy()[rare] == OOV_INDEX).all()
    assert (encoded["item"].to_numpy()[~rare] >= FIRST_VALUE_INDEX).all()
    assert stats["item"]["oov_rows"] == int(rare.sum())
    with pytest.raises(ValueError, match="min_count"):
        EncoderParams(min_count=0)


# ------------------------------------------------------------------ numeric buckets


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (-1.0, -1), (0.0, 0), (1.0, 1), (2.0, 2),  # v <= 2: v itself
        (2.5, 0),  # log(2.5)^2 = 0.840
        (3.0, 1),  # log(3)^2 = 1.207
        (10.0, 5), (11.0, 5),  # 5.302, 5.750
        (20.0, 8),  # 8.974
        (100.0, 21),  # 21.208
        (1000.0, 47),  # 47.717
        (1e6, 190),  # 190.868
    ],
)
def test_log_buckets_hand_computed(value, bucket):
    enc = FieldEncoder("x", "numeric", "context", [], bucketing="log")
    assert enc.bucket(pa.array([value], pa.float64())).to_pylist() == [bucket]


def test_log_buckets_missing_stays_missing_and_indexes():
    train = pd.DataFrame({"label": pd.array([0, 1, 0, 1, 0], dtype="int8[pyarrow]"),
                          "x": pd.array([10.0, 11.0, 100.0, None, 1.0], dtype="double[pyarrow]")})
    enc = FeatureEncoder.fit(train, TableSchema(numeric=("x",)), EncoderParams())
    assert enc.field("x").bucket(pa.array([10.0, None, 1.0])).to_pylist() == [5, None, 1]
    assert enc.field("x").vocab == [5, None, 1, 21]  # by count, ties by text: "1" < "21" < "None"? no:
