"""Train/validation/test splits of the real MovieLens latest-small table."""

from __future__ import annotations

import numpy as np
import pytest

from dynamic_ctr.data.split import SplitParams, split_frame, split_indices

N = 100_836


def _sizes(parts) -> list[int]:
    return [len(p) for p in parts]


def test_random_split_is_seeded_and_reproducible():
    a = split_indices(N, SplitParams(seed=7))
    b = split_indices(N, SplitParams(seed=7))
    c = split_indices(N, SplitParams(seed=8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Shuffled, not a prefix: the training part reaches into the end of the table.
    assert a[0].max() > N - 100 and a[2].min() < 100


@pytest.mark.parametrize("ratios", [(0.7, 0.1, 0.2), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.98, 0.01, 0.01)])
def test_ratios_respected_disjoint_and_covering(ratios):
    parts = split_indices(N, SplitParams(ratios=ratios))
    n_train, n_valid = round(N * ratios[0]), round(N * ratios[1])
    assert _sizes(parts) == [n_train, n_valid, N - n_train - n_valid]
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == N  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(N))  # ... and covering
    for p in parts:
        assert (np.diff(p) > 0).all()  # sorted within each part


def test_split_frame_on_real_rows(latest_table):
    train, valid, test = split_frame(latest_table, SplitParams(), "timestamp")
    assert _sizes((train, valid, test)) == [70_585, 10_084, 20_167]
    lines = [set(p["source_line"].tolist()) for p in (train, valid, test)]
    assert not (lines[0] & lines[1]) and not (lines[0] & lines[2]) and not (lines[1] & lines[2])
    assert lines[0] | lines[1] | lines[2] == set(latest_table["source_line"].tolist())
    # Rows are moved whole: each keeps its own user, item and label.
    by_line = latest_table.set_index("source_line")
    sample = test.iloc[::500]
    for line, user, item, label in zip(sample["source_line"], sample["user"], sample["item"], sample["label"]):
        assert (by_line.at[line, "user"], by_line.at[line, "item"], by_line.at[line, "label"]) == (user, item, label)
    # Both labels in every part, at about the overall rate.
    overall = latest_table["label"].astype("float64").mean()
    for p in (train, valid, test):
        assert abs(p["label"].astype("float64").mean() - overall) < 0.02


def test_time_split_puts_the_oldest_rows_in_train(latest_table):
    train, valid, test = split_frame(latest_table, SplitParams(method="time"), "timestamp")
    assert _sizes((train, valid, test)) == [70_585, 10_084, 20_167]
    assert train["timestamp"].max() <= valid["timestamp"].min()
    assert valid["timestamp"].max() <= test["timestamp"].min()
    ts = np.sort(latest_table["timestamp"].to_numpy(dtype=np.int64))
    assert train["timestamp"].max() == ts[70_585 - 1]
    # The seed plays no part in a time split.
    again = split_frame(latest_table, SplitParams(method="time", seed=1), "timestamp")
    assert again[0]["source_line"].tolist() == train["source_line"].tolist()


def test_time_split_needs_a_time_key(latest_table):
    with pytest.raises(ValueError, match="time_key"):
        split_frame(latest_table, SplitParams(method="time"), None)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"ratios": (0.7, 0.2, 0.2)}, "features.split.ratios"),
        ({"ratios": (0.7, 0.3)}, "features.split.ratios"),
        ({"ratios": (0.8, 0.0, 0.2)}, "features.split.ratios"),
        ({"ratios": (1.2, -0.1, -0.1)}, "features.split.ratios"),
        ({"method": "stratified"}, "features.split.method"),
    ],
    ids=["sum-not-1", "two-parts", "zero-part", "negative-part", "unknown-method"],
)
def test_bad_parameters_name_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter.replace(".", r"\.")):
        SplitParams(**kwargs)


def test_too_few_rows_for_the_ratios():
    with pytest.raises(ValueError, match=r"features\.split\.ratios=\[0\.7, 0\.1, 0\.2\] leave an empty part for 4 rows"):
        split_indices(4, SplitParams())


# ------------------------------------------------------------------ hash split (streaming)


def test_hash_split_decides_each_row_alone(latest_table):
    """A row's part depends on its key and the seed only: the same rows land in the same
    parts whether the table is split whole, in batches, or with rows added."""
    from dynamic_ctr.data.split import hash_parts

    params = SplitParams(method="hash", seed=7)
    keys = latest_table[["user", "item"]]
    whole = hash_parts(keys, params)
    batched = np.concatenate([hash_parts(keys.iloc[i : i + 9_999], params) for i in range(0, len(keys), 9_999)])
    np.testing.assert_array_equal(whole, batched)
    np.testing.assert_array_equal(hash_parts(keys.iloc[::-1], params), whole[::-1])
    shares = np.bincount(whole, minlength=3) / len(whole)
    np.testing.assert_allclose(shares, [0.7, 0.1, 0.2], atol=0.005)  # binomial sd ~0.0014
    other_seed = hash_parts(keys, SplitParams(method="hash", seed=8))
    assert 0.45 < (other_seed == whole).mean() < 0.6  # independent draws agree ~54% of the time


def test_hash_split_of_integer_and_text_keys(latest_table):
    train, valid, test = split_frame(latest_table, SplitParams(method="hash", key=("source_line",)), "timestamp")
    lines = [set(p["source_line"].tolist()) for p in (train, valid, test)]
    assert sum(len(x) for x in lines) == len(latest_table) and not lines[0] & lines[2]
    assert abs(len(train) / len(latest_table) - 0.7) < 0.01
    as_text = latest_table.assign(source_line=latest_table["source_line"].astype(str))
    text_train, _, _ = split_frame(as_text, SplitParams(method="hash", key=("source_line",)), "timestamp")
    assert abs(len(text_train) / len(latest_table) - 0.7) < 0.01  # a different hash, the same shares


def test_hash_split_parameters_are_checked(latest_table):
    with pytest.raises(ValueError, match=r"features.split.key: column\(s\) \['nope'\] not in the table"):
        split_frame(latest_table, SplitParams(method="hash", key=("nope",)), "timestamp")
    with pytest.raises(ValueError, match="needs features.split.key: this adapter names no key columns"):
        split_frame(latest_table, SplitParams(method="hash"), "timestamp")
    with pytest.raises(ValueError, match="features.split.key is for method 'hash', not 'random'"):
        SplitParams(key=("user",))
    with pytest.raises(ValueError, match=r"unknown features.split parameter\(s\) \['seeds'\]"):
        SplitParams.from_dict({"method": "hash", "seeds": 1})
    assert SplitParams.from_dict({"method": "hash", "key": "user"}).key == ("user",)
