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
    train_items, train_users = set(train["item"].tolist()), set(train["user"].tolist())
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
        assert stats["user"]["oov_rows"] == sum(u not in train_users for u in frame["user"].tolist())
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
        (2.5, 3),  # log(2.5)^2 = 0.840, + 3 (log buckets start above small values)
        (3.0, 4),  # log(3)^2 = 1.207: 1 + 3, not v = 1's bucket
        (10.0, 8), (11.0, 8),  # 5.302, 5.750
        (20.0, 11),  # 8.974
        (100.0, 24),  # 21.208
        (1000.0, 50),  # 47.717
        (1e6, 193),  # 190.868
    ],
)
def test_log_buckets_hand_computed(value, bucket):
    enc = FieldEncoder("x", "numeric", "context", [], bucketing="log")
    assert enc.bucket(pa.array([value], pa.float64())).to_pylist() == [bucket]


def test_log_buckets_missing_stays_missing_and_indexes():
    train = pd.DataFrame({"label": pd.array([0, 1, 0, 1, 0], dtype="int8[pyarrow]"),
                          "x": pd.array([10.0, 11.0, 100.0, None, 1.0], dtype="double[pyarrow]")})
    enc = FeatureEncoder.fit(train, TableSchema(numeric=("x",)), EncoderParams())
    assert enc.field("x").bucket(pa.array([10.0, None, 1.0])).to_pylist() == [8, None, 1]
    # By training count, ties by text (a missing value sorts as "").
    assert enc.field("x").vocab == [8, None, 1, 24]
    valid = pd.DataFrame({"label": pd.array([1, 1, 0, 0], dtype="int8[pyarrow]"),
                          "x": pd.array([12.0, None, 3.0, 7.0], dtype="double[pyarrow]")})
    encoded, stats = enc.transform(valid)
    # 12 -> bucket 9 (unseen), missing -> seen, 3 -> bucket 4 (unseen: no collision with v=1), 7 -> 6 (unseen)
    assert encoded["x"].tolist() == [OOV_INDEX, 3, OOV_INDEX, OOV_INDEX]
    assert stats["x"]["oov_rows"] == 3


@pytest.mark.data_root
def test_log_buckets_on_criteo_counts(conf, data_root):
    table = conf.run("criteo", data_root).table
    for name in ("I2", "I5", "I13"):
        values = table[name].to_numpy(dtype=np.float64, na_value=np.nan)
        enc = FieldEncoder(name, "numeric", "context", [], bucketing="log")
        got = enc.bucket(pa.array(values)).to_pylist()
        expected = [None if math.isnan(v) else (math.floor(math.log(v) ** 2) + 3 if v > 2 else int(v)) for v in values]
        assert got == expected, name


def test_quantile_edges_hand_computed_from_train_only():
    train = pd.DataFrame({"label": pd.array([0, 1] * 4, dtype="int8[pyarrow]"),
                          "x": pd.array([1, 2, 3, 4, 5, 6, 7, 8], dtype="double[pyarrow]")})
    enc = FeatureEncoder.fit(train, TableSchema(numeric=("x",)), EncoderParams(numeric_buckets="quantile", quantile_buckets=4))
    # Quartiles of 1..8 (linear interpolation): positions 1.75, 3.5, 5.25.
    assert enc.field("x").edges == [2.75, 4.5, 6.25]
    assert enc.field("x").bucket(pa.array([1.0, 2.75, 3.0, 4.5, 6.0, 8.0])).to_pylist() == [0, 1, 1, 2, 2, 3]
    # Validation values far outside the training range fall in the outer buckets.
    valid = pd.DataFrame({"label": pd.array([0, 0], dtype="int8[pyarrow]"), "x": pd.array([-1e9, 1e9], dtype="double[pyarrow]")})
    encoded, stats = enc.transform(valid)
    lowest, highest = enc.transform(train)[0]["x"].iloc[[0, -1]].tolist()
    assert encoded["x"].tolist() == [lowest, highest] and stats["x"]["oov_rows"] == 0


def test_quantile_edges_ignore_later_rows_of_a_time_split(latest_table):
    train, valid, test = split_frame(latest_table, SplitParams(method="time"), "timestamp")
    schema = TableSchema(categorical=("user",), numeric=("timestamp",))
    enc = FeatureEncoder.fit(train, schema, EncoderParams(numeric_buckets="quantile", quantile_buckets=16))
    edges = enc.field("timestamp").edges
    assert len(edges) == 15 and edges == sorted(edges) and edges[-1] <= train["timestamp"].max()
    # The training rows spread over the 16 buckets...
    per_bucket = Counter(enc.field("timestamp").bucket(pa.array(train["timestamp"].to_numpy())).to_pylist())
    assert len(per_bucket) == 16 and max(per_bucket.values()) < 2 * len(train) / 16
    # ...while every later (test) row is past the last training edge: edges saw no test row.
    encoded, _ = enc.transform(test)
    last = enc.field("timestamp").vocab.index(15) + FIRST_VALUE_INDEX
    assert set(encoded["timestamp"]) == {last}


# ------------------------------------------------------------------ multi-valued fields


def test_multi_valued_slots_lengths_and_truncation(splits, latest_result, params):
    train, _, test = splits
    enc = FeatureEncoder.fit(train, latest_result.schema, replace(params, max_len={"genres": 3, "tags": 10}))
    assert enc.field("genres").max_len == 3
    encoded, stats = enc.transform(test)
    index = _index_of(enc.field("genres"))
    slots = encoded[["genres__0", "genres__1", "genres__2"]].to_numpy()
    lengths = encoded["genres__len"].to_numpy()
    assert encoded["genres__len"].dtype == np.int16 and slots.dtype == np.int32
    genres = [list(g) for g in test["genres"].tolist()]
    for row, g in enumerate(genres):
        kept = [index.get(x, OOV_INDEX) for x in g[:3]]
        assert slots[row].tolist() == kept + [PAD_INDEX] * (3 - len(kept)), row
        assert lengths[row] == min(len(g), 3)
    assert stats["genres"]["truncated_rows"] == sum(len(g) > 3 for g in genres) > 0
    assert any(len(g) == 0 for g in genres)  # "(no genres listed)": all padding
    spec = enc.feature_spec()["genres"]
    assert (spec.kind, spec.max_len, spec.vocab_size) == ("sequence", 3, len(enc.field("genres").vocab) + 2)


def test_automatic_max_len_and_cap(splits, latest_result):
    train = splits[0]
    lengths = np.array([len(g) for g in train["genres"].tolist()])
    enc = FeatureEncoder.fit(train, latest_result.schema, EncoderParams())
    p99 = int(np.ceil(np.percentile(lengths, 99)))
    assert 1 < p99 < lengths.max()
    assert enc.field("genres").max_len == p99
    capped = FeatureEncoder.fit(train, latest_result.schema, EncoderParams(max_len_cap=2))
    assert capped.field("genres").max_len == 2


# ------------------------------------------------------------------ saving and chunking


def test_saved_encoder_reencodes_new_data_identically(splits, encoder, conf, latest_result):
    test = splits[2]
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    assert restored.feature_spec() == encoder.feature_spec()
    for frame in (test, test.iloc[::-1].reset_index(drop=True)):
        a, stats_a = encoder.transform(frame, passthrough=("source_line",))
        b, stats_b = restored.transform(frame, passthrough=("source_line",))
        pd.testing.assert_frame_equal(a, b)
        assert stats_a == stats_b
    # New rows read from another raw file (the shipped 30-user sample) encode alike too.
    tiny = conf.run("tiny").table
    _, (tiny,), _ = aggregate_item_lists(splits[0], [tiny], latest_result.schema)
    a, stats_a = encoder.transform(tiny)
    b, stats_b = restored.transform(tiny)
    pd.testing.assert_frame_equal(a, b)
    assert stats_a == stats_b
    index = _index_of(restored.field("item"))
    assert a["item"].tolist() == [index.get(i, OOV_INDEX) for i in tiny["item"].tolist()]
    with pytest.raises(ValueError, match="format_version"):
        FeatureEncoder.from_dict({**encoder.to_dict(), "format_version": 99})


@pytest.mark.parametrize("chunk_rows", [1, 997, 5000])
def test_chunked_transform_equals_unchunked(splits, encoder, chunk_rows):
    frame = splits[2] if chunk_rows > 1 else splits[2].iloc[100:260]
    whole, stats_whole = encoder.transform(frame)
    chunked = FeatureEncoder(encoder.fields, encoder.schema, replace(encoder.params, chunk_rows=chunk_rows))
    parts, stats_parts = chunked.transform(frame)
    pd.testing.assert_frame_equal(whole, parts)
    assert stats_whole == stats_parts


# ------------------------------------------------------------------ item aggregation


def test_aggregate_item_lists_reads_training_rows_only(raw_splits, latest_result):
    train, valid, test = (f.copy() for f in raw_splits)
    train_items = set(train["item"].tolist())
    # A tag given only in a test row, for an item that has training rows ...
    row = next(i for i, item in enumerate(test["item"].tolist()) if item in train_items)
    # ... and tags on a test row of an item that has none.
    lonely = next(i for i, item in enumerate(test["item"].tolist()) if item not in train_items)
    tags = [list(t) for t in test["tags"].tolist()]
    tags[row] = [*tags[row], LEAK_TAG]
    tags[lonely] = ["only-in-test"]
    test["tags"] = pd.array(tags, dtype=pd.ArrowDtype(pa.list_(pa.string())))

    new_train, (new_valid, new_test), notes = aggregate_item_lists(train, [valid, test], latest_result.schema)
    for frame in (new_train, new_valid, new_test):
        flat = {t for ts in frame["tags"].tolist() for t in ts}
        assert LEAK_TAG not in flat and "only-in-test" not in flat
    assert list(new_test["tags"].iloc[lonely]) == []

    # Each item's list: its training tags, most frequent first (ties by text).
    per_item: dict[int, Counter] = {}
    for item, ts in zip(train["item"].tolist(), train["tags"].tolist()):
        per_item.setdefault(item, Counter()).update(ts)
    expected = {i: [t for t, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))] for i, c in per_item.items()}
    assert notes["tags_items_with_values"] == sum(1 for v in expected.values() if v)
    for frame in (new_train, new_test):
        for item, ts in zip(frame["item"].tolist(), frame["tags"].tolist()):
            assert list(ts) == expected.get(item, []), item
    # Rows and everything but the aggregated column are untouched.
    pd.testing.assert_frame_equal(new_test.drop(columns="tags"), test.drop(columns="tags"))


def test_item_lists_are_a_no_op_without_item_level_columns() -> None:
    """Criteo and Avazu have no item key and no item-level lists: the frames pass through."""
    import pandas as pd

    from dynamic_ctr.data.encoder import aggregate_item_lists
    from dynamic_ctr.data.schema import TableSchema

    schema = TableSchema(label="label", categorical=("c1",))
    frame = pd.DataFrame({"label": [0, 1], "c1": ["a", "b"]})
    train, (other,), counts = aggregate_item_lists(frame, [frame], schema)
    assert train is frame and other is frame and counts == {}


# ------------------------------------------------------------------ fitting from counts (streaming)


@pytest.mark.parametrize("buckets", [4, 16, 32])
def test_quantile_edges_from_counts_equal_numpy_on_the_expanded_values(latest_table, buckets):
    """Edges fitted from (value, count) pairs are numpy's ``np.quantile`` of the rows,
    bit for bit: the streaming fit never expands the counts."""
    train = latest_table.iloc[:30_000]
    enc = FeatureEncoder.fit(train, TableSchema(numeric=("timestamp", "year")), EncoderParams(numeric_buckets="quantile", quantile_buckets=buckets))
    for name in ("timestamp", "year"):
        v = train[name].astype("float64").to_numpy()
        v = v[~np.isnan(v)]
        expected = np.unique(np.quantile(v, np.linspace(0, 1, buckets + 1)[1:-1])).tolist()
        assert enc.field(name).edges == expected, name


@pytest.mark.parametrize("numeric_buckets", ["log", "quantile"])
def test_counts_of_batches_merged_fit_the_same_encoder_as_the_whole_table(splits, latest_result, params, numeric_buckets):
    """What the streaming pipeline relies on: counting disjoint batches and merging the
    counts fits exactly the encoder of the whole training split (vocabulary order, ties,
    missing values, buckets, quantile edges, automatic max_len)."""
    from dynamic_ctr.data.encoder import count_fields, merge_counts

    train = splits[0]
    base = latest_result.schema
    # The timestamp as a numeric feature too, so numeric buckets are fitted from counts.
    schema = replace(base, numeric=(*base.numeric, "timestamp"))
    p = replace(params, numeric_buckets=numeric_buckets, min_count=2)
    whole = FeatureEncoder.fit(train, schema, p)
    total = None
    for start in range(0, len(train), 9_973):  # uneven batches: some values straddle them
        total = merge_counts(total, count_fields(train.iloc[start : start + 9_973], schema))
    streamed = FeatureEncoder.from_counts(total, schema, p)
    assert streamed.to_dict() == whole.to_dict()
    assert any(f.kind == "multi_valued" for f in streamed.fields) and any(f.kind == "numeric" for f in streamed.fields)
