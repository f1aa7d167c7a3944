"""Domains and activity groups on real rows (MovieLens-100K demographics from the data
root, MovieLens latest-small genres)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from dynamic_ctr.data.domains import OTHER, DomainEncoder, DomainParams, domain_keys, domain_table, frequency_groups
from dynamic_ctr.data.split import SplitParams, split_frame
from dynamic_ctr.spec import OOV_INDEX


def _age_group(age: int) -> str:
    """conf/ml100k's bins [18, 25, 35, 45, 56], right-open, written by hand."""
    if age < 18:
        return "<18"
    for low, high in ((18, 24), (25, 34), (35, 44), (45, 55)):
        if low <= age <= high:
            return f"{low}-{high}"
    return "56+"


@pytest.fixture(scope="module")
def ml100k_params(conf) -> DomainParams:
    return DomainParams.from_dict(conf.params("ml100k", "domains"))


@pytest.fixture(scope="module")
def ml100k_splits(ml100k_result):
    return split_frame(ml100k_result.table, SplitParams(), "timestamp")


@pytest.mark.data_root
def test_demographic_domain_keys(ml100k_result, ml100k_params):
    table = ml100k_result.table
    keys = domain_keys(table, ml100k_params.features).tolist()
    expected = [f"{g} | {_age_group(int(a))} | {o}" for g, a, o in zip(table["gender"], table["age"], table["occupation"])]
    assert keys == expected
    ages = table["age"].astype("int64")
    for age, group in ((17, "<18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (55, "45-55"), (56, "56+")):
        rows = np.flatnonzero((ages == age).to_numpy())
        assert rows.size, age  # the real data has users of this age
        assert all(keys[i].split(" | ")[1] == group for i in rows), age
    assert len(set(keys)) > 100


@pytest.mark.data_root
def test_rare_domains_merge_into_other(ml100k_splits, ml100k_params):
    train, _, test = ml100k_splits
    assert ml100k_params.min_support == 100
    enc = DomainEncoder.fit(train, ml100k_params)
    support = Counter(domain_keys(train, ml100k_params.features).tolist())
    kept = {k for k, n in support.items() if n >= 100}
    assert enc.names[0] == OTHER
    assert set(enc.names[1:]) == kept and 0 < len(kept) < len(support)
    assert len(kept) >= 80  # a multi-domain set-up: about a hundred domains with a long tail
    # Ids follow training support (ties by name): index 2 is the largest domain.
    assert enc.names[1:] == sorted(kept, key=lambda k: (-support[k], k))
    assert enc.support[OTHER] == sum(n for k, n in support.items() if k not in kept)
    assert sum(enc.support.values()) == len(train)
    assert enc.vocab_size == len(enc.names) + 1

    ids = enc.transform(test)
    index = {name: i + OOV_INDEX for i, name in enumerate(enc.names)}
    test_keys = domain_keys(test, ml100k_params.features).tolist()
    assert ids.dtype == np.int32
    assert ids.tolist() == [index.get(k, OOV_INDEX) for k in test_keys]
    assert (ids == OOV_INDEX).sum() == sum(k not in kept for k in test_keys) > 0
    assert ids.min() >= OOV_INDEX and ids.max() == len(enc.names)

    # A domain never seen in training is __other__ as well.
    unseen = test.head(3).assign(gender=pd.array(["X"] * 3, dtype="string[pyarrow]"))
    assert enc.transform(unseen).tolist() == [OOV_INDEX] * 3

    restored = DomainEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    np.testing.assert_array_equal(restored.transform(test), ids)


def _decade(year: object) -> str:
    if year is None or pd.isna(year):
        return "(none)"
    edges = [1930, 1940, 1950, 1960, 1970, 1980, 1990, 2000, 2010]
    if year < edges[0]:
        return "<1930"
    if year >= edges[-1]:
        return "2010+"
    low = max(e for e in edges if e <= year)
    return f"{low}-{low + 9}"


def test_first_genre_by_decade_domains(latest_table, conf):
    """The shipped data's domains: first genre x release decade, a long tail of 70-odd."""
    params = DomainParams.from_dict(conf.params("base", "domains"))
    keys = domain_keys(latest_table, params.features).tolist()
    genres, years = latest_table["genres"].tolist(), latest_table["year"].tolist()
    assert keys == [f"{g[0] if len(g) else '(none)'} | {_decade(y)}" for g, y in zip(genres, years)]
    assert any(k.startswith("(none) | ") for k in keys)  # movies with "(no genres listed)"
    train, valid, _ = split_frame(latest_table, SplitParams(), "timestamp")
    enc = DomainEncoder.fit(train, params)
    support = Counter(domain_keys(train, params.features).tolist())
    assert enc.names[1:] == sorted((k for k, n in support.items() if n >= params.min_support), key=lambda k: (-support[k], k))
    assert 40 <= len(enc.names) - 1 <= 150  # tens to hundreds of domains
    sizes = sorted(support[k] for k in enc.names[1:])
    assert sizes[-1] > 20 * sizes[0]  # a long tail
    ids = enc.transform(valid)
    valid_keys = domain_keys(valid, params.features).tolist()
    assert ids.tolist() == [enc.names.index(k) + 1 if k in enc.names else OOV_INDEX for k in valid_keys]


def test_domain_params_validation():
    with pytest.raises(ValueError, match="domains.features"):
        DomainParams.from_dict({"features": []})
    with pytest.raises(ValueError, match="unknown"):
        DomainParams.from_dict({"features": ["gender"], "min_suport": 3})
    with pytest.raises(ValueError, match="min_support"):
        DomainParams.from_dict({"features": ["gender"], "min_support": 0})


# ------------------------------------------------------------------ activity groups


@pytest.mark.parametrize("source", ["latest", pytest.param("ml100k", marks=pytest.mark.data_root)])
def test_frequency_groups_equal_size_and_monotone(source, request):
    table = request.getfixturevalue("latest_table" if source == "latest" else "ml100k_result")
    table = table if source == "latest" else table.table
    train = split_frame(table, SplitParams(), "timestamp")[0]
    groups = frequency_groups(train, "user", 10)
    activity = Counter(train["user"].tolist())
    assert len(groups) == len(activity)
    assert dict(zip(groups["key"], groups["interactions"])) == activity
    sizes = groups["group"].value_counts().sort_index()
    assert sizes.index.tolist() == list(range(10))
    assert sizes.max() - sizes.min() <= 1
    # Monotone: every user of a group is at most as active as every user of the next.
    by_group = groups.groupby("group")["interactions"]
    assert (by_group.max().to_numpy()[:-1] <= by_group.min().to_numpy()[1:]).all()
    assert by_group.mean().is_monotonic_increasing
    # Reproducible, whatever the row order.
    shuffled = train.sample(frac=1.0, random_state=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(frequency_groups(shuffled, "user", 10), groups)


def test_domain_table_sums_to_the_splits(latest_table, conf):
    params = DomainParams.from_dict(conf.params("base", "domains"))
    parts = dict(zip(("train", "valid", "test"), split_frame(latest_table, SplitParams(), "timestamp")))
    enc = DomainEncoder.fit(parts["train"], params)
    stats = {name: (enc.transform(p), p["label"].to_numpy(dtype=np.int64)) for name, p in parts.items()}
    table = domain_table(stats, enc.names)
    for name, frame in parts.items():
        rows = table[table["split"] == name]
        assert rows["samples"].sum() == len(frame)
        assert rows["clicks"].sum() == int(frame["label"].astype("int64").sum())
    for _, r in table.iterrows():
        assert r["name"] == enc.names[r["domain"] - 1]
        assert r["ctr"] == pytest.approx(r["clicks"] / r["samples"])
    train_rows = table[table["split"] == "train"].set_index("name")["samples"].to_dict()
    assert train_rows == {k: v for k, v in enc.support.items() if v}
