"""Every ingestion adapter on real data, read as the project's catalogs configure it.

Expected values are computed independently from the raw files (``csv`` module, plain
Python dates), not by the code under test. Data sets that may not be shipped are read
from the data root; transformed copies (GroupLens ``u.*``, MovieLens-1M ``.dat``,
IJCAI-18, generic CSV/Parquet) are written to ``tmp_path`` only.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynamic_ctr.data.adapters import ADAPTERS, CRITEO_CATEGORICAL, CRITEO_NUMERIC, IJCAI_CATEGORICAL, IJCAI_NUMERIC
from dynamic_ctr.data.raw import RawFileConfig, read_raw
from dynamic_ctr.pipelines.ingestion.nodes import ingest
# tests/formats.py: pytest puts tests/ on sys.path (tests/conftest.py, no __init__.py).
from formats import IJCAI_GENRE_IDS, IJCAI_HEADER, LAYOUT, write_grouplens_100k, write_ijcai18, write_ml1m


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(int(ts), tz=timezone.utc)


def _year_of(title: str) -> int | None:
    """The year in a trailing "(YYYY)" of a MovieLens title (independent of the adapter)."""
    t = title.strip()
    if len(t) >= 6 and t[-1] == ")" and t[-6] == "(" and t[-5:-1].isdigit():
        return int(t[-5:-1])
    return None


def _lists(series: pd.Series) -> list[list[str]]:
    return [list(v) for v in series.tolist()]


# ------------------------------------------------------------------ MovieLens latest


def test_movielens_latest_rows_and_labels_match_ratings_csv(latest_result, shipped):
    with (shipped / "ratings.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = latest_result.table
    assert len(rows) == 100_836
    assert len(table) == len(rows)
    # Same rows, in file order, each traced to its line (header = line 1).
    np.testing.assert_array_equal(table["user"].to_numpy(dtype=np.int64), [int(r["userId"]) for r in rows])
    np.testing.assert_array_equal(table["item"].to_numpy(dtype=np.int64), [int(r["movieId"]) for r in rows])
    np.testing.assert_array_equal(table["source_line"].to_numpy(dtype=np.int64), np.arange(2, len(rows) + 2))
    clicks = sum(float(r["rating"]) >= 4.0 for r in rows)
    assert int(table["label"].astype("int64").sum()) == clicks
    assert str(table["label"].dtype) == "int8[pyarrow]"
    assert set(table["label"].unique().tolist()) == {0, 1}
    assert round(clicks / len(rows), 3) == 0.482
    assert latest_result.quarantine.frame().empty


def test_movielens_latest_genres_and_year_per_item(latest_result, shipped):
    with (shipped / "movies.csv").open(newline="", encoding="utf-8") as f:
        movies = {int(r["movieId"]): r for r in csv.DictReader(f)}
    per_item = latest_result.table.drop_duplicates("item")
    with (shipped / "ratings.csv").open(newline="", encoding="utf-8") as f:
        rated_items = {int(r["movieId"]) for r in csv.DictReader(f)}
    assert set(per_item["item"].tolist()) == rated_items
    checked_no_year = 0
    for item, genres, year in zip(per_item["item"].tolist(), per_item["genres"].tolist(), per_item["year"].tolist()):
        raw = movies[item]
        expected_genres = [] if raw["genres"] == "(no genres listed)" else raw["genres"].split("|")
        assert list(genres) == expected_genres, item
        expected_year = _year_of(raw["title"])
        if expected_year is None:
            assert pd.isna(year), (item, raw["title"], year)
            checked_no_year += 1
        else:
            assert year == expected_year, (item, raw["title"], year)
    toy_story = per_item[per_item["item"] == 1].iloc[0]
    assert list(toy_story["genres"]) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy_story["year"] == 1995
    assert checked_no_year > 0  # titles without a year ("Babylon 5") give a missing year


def test_movielens_latest_tags_joined_per_user_and_item(latest_result, shipped):
    with (shipped / "tags.csv").open(newline="", encoding="utf-8") as f:
        tag_rows = list(csv.DictReader(f))
    expected: dict[tuple[int, int], list[str]] = {}
    for r in tag_rows:
        expected.setdefault((int(r["userId"]), int(r["movieId"])), []).append(r["tag"])
    table = latest_result.table
    got = {
        (u, i): list(t)
        for u, i, t in zip(table["user"].tolist(), table["item"].tolist(), table["tags"].tolist())
        if len(t)
    }
    rated = set(zip(table["user"].tolist(), table["item"].tolist()))
    assert got == {k: v for k, v in expected.items() if k in rated}
    assert latest_result.notes["tags_without_a_rating"] == sum(k not in rated for k in expected)
    assert latest_result.notes["tags_without_a_rating"] > 0
    assert latest_result.schema.item_aggregated == ("tags",)
    assert str(table["tags"].dtype) == "list<item: string>[pyarrow]"


def test_movielens_latest_hour_and_weekday_are_utc(latest_result):
    table = latest_result.table
    ts = table["timestamp"].to_numpy(dtype=np.int64)
    hour, weekday = table["hour"].to_numpy(dtype=np.int64), table["weekday"].to_numpy(dtype=np.int64)
    assert hour.min() >= 0 and hour.max() <= 23 and weekday.min() >= 0 and weekday.max() <= 6
    # 1970-01-01 was a Thursday (Monday = 0).
    np.testing.assert_array_equal(hour, (ts // 3600) % 24)
    np.testing.assert_array_equal(weekday, (ts // 86400 + 3) % 7)
    for i in range(0, len(table), 9973):
        when = _utc(ts[i])
        assert (hour[i], weekday[i]) == (when.hour, when.weekday())


def test_movielens_latest_ingest_report_accounts_for_every_row(conf, shipped):
    with (shipped / "ratings.csv").open(newline="", encoding="utf-8") as f:
        ratings = [float(r["rating"]) for r in csv.DictReader(f)]
    raw = conf.read_env("base")
    params = conf.params("base", "ingestion")
    clean, quarantine, schema, report = ingest(raw, params)
    assert quarantine.empty
    assert report["rows"] == len(clean) == 100_836
    for path, f in report["files"].items():
        assert f["rows_read"] == f["rows_kept"] + f["rows_quarantined"]
        assert f["rows_quarantined"] == 0, path
    assert report["files"][str(shipped / "ratings.csv")]["main"] is True
    assert report["files"][str(shipped / "tags.csv")]["rows_read"] == 3683
    assert report["positive_rate"] == pytest.approx(sum(r >= 4.0 for r in ratings) / len(ratings), rel=1e-12)
    assert json.loads(json.dumps(schema))["user_key"] == "user"


# ------------------------------------------------------------------ MovieLens-100K


@pytest.mark.data_root
def test_movielens_100k_typed_layout(ml100k_result, data_root):
    folder = data_root / "movielens-100k"
    with (folder / "ml-100k.inter").open(encoding="utf-8") as f:
        inter = [line.rstrip("\n").split("\t") for line in f][1:]
    with (folder / "ml-100k.user").open(encoding="utf-8") as f:
        users = {int(p[0]): p for p in (line.rstrip("\n").split("\t") for line in list(f)[1:])}
    table = ml100k_result.table
    assert len(table) == len(inter) == 100_000
    np.testing.assert_array_equal(table["user"].to_numpy(dtype=np.int64), [int(r[0]) for r in inter])
    np.testing.assert_array_equal(table["item"].to_numpy(dtype=np.int64), [int(r[1]) for r in inter])
    np.testing.assert_array_equal(table["label"].to_numpy(dtype=np.int64), [int(float(r[2]) >= 4) for r in inter])
    for column in ("age", "gender", "occupation", "zip"):
        assert column in table.columns
    # Every row carries its own user's demographics.
    sample = table.iloc[::997]
    for u, age, gender, occ, zip_code in zip(sample["user"], sample["age"], sample["gender"], sample["occupation"], sample["zip"]):
        assert [str(u), str(age), gender, occ, zip_code] == users[u]
    assert ml100k_result.schema.numeric == ("age",)
    assert {"gender", "occupation", "zip"} <= set(ml100k_result.schema.categorical)
    assert ml100k_result.quarantine.frame().empty
    # Two items have a non-year release_year ("unkonwn", "V"): set missing and counted, not quarantined.
    item_path = str(folder / "ml-100k.item")
    assert ml100k_result.quarantine.set_missing == {item_path: {"release_year": 2}}
    assert table.loc[table["item"] == 267, "year"].isna().all()


@pytest.mark.data_root
def test_movielens_100k_grouplens_layout_equals_typed_layout(conf, ml100k_result, data_root, tmp_path):
    titles = write_grouplens_100k(data_root / "movielens-100k", tmp_path / LAYOUT["ml100k_grouplens"])
    # An accented title, in Latin-1 bytes.
    assert b"Mis\xe9rables" in (tmp_path / "ml-100k" / "u.item").read_bytes()
    files = conf.raw_files("ml100k_grouplens", tmp_path)
    assert files["movies"]["encoding"] == "latin-1" and len(files["movies"]["names"]) == 24
    raw = conf.read(files)
    movies_raw = raw["movies"].table.to_pandas()
    assert movies_raw.loc[movies_raw["movie_id"] == "543", "title"].item() == "Misérables, Les (1995)"
    assert movies_raw["title"].tolist() == list(titles.values())

    params = conf.params("ml100k_grouplens", "ingestion")
    assert params["options"]["layout"] == "grouplens"
    grouplens = ADAPTERS[params["adapter"]](raw, params["options"])
    typed = ml100k_result.table
    assert grouplens.quarantine.frame().empty
    keys = ["user", "item", "label"]
    pd.testing.assert_frame_equal(
        grouplens.table[keys].astype("int64").reset_index(drop=True), typed[keys].astype("int64").reset_index(drop=True)
    )
    # Same genres per item (GroupLens lists them in flag order, the typed file in its own).
    def per_item(t: pd.DataFrame) -> dict[int, tuple[list[str], object]]:
        first = t.drop_duplicates("item")
        return {i: (sorted(g), y) for i, g, y in zip(first["item"].tolist(), first["genres"].tolist(), first["year"].tolist())}

    a, b = per_item(grouplens.table), per_item(typed)
    assert a.keys() == b.keys()
    for item in a:
        assert a[item][0] == b[item][0], item
        assert (pd.isna(a[item][1]) and pd.isna(b[item][1])) or a[item][1] == b[item][1], item
    for column in ("age", "gender", "occupation", "zip", "hour", "weekday"):
        np.testing.assert_array_equal(grouplens.table[column].to_numpy(), typed[column].to_numpy(), err_msg=column)
    assert grouplens.schema == ml100k_result.schema


# ------------------------------------------------------------------ MovieLens-1M


@pytest.mark.data_root
def test_movielens_1m_dat_files_in_latin1(conf, data_root, tmp_path):
    typed = data_root / "movielens-100k"
    written = write_ml1m(typed, tmp_path / LAYOUT["ml1m"], rows=20_000)
    inter, users, years = written.inter, written.users, written.years
    # The writer's rows are the typed file's first 20,000, read here independently.
    with (typed / "ml-100k.inter").open(encoding="utf-8") as f:
        assert inter == [line.rstrip("\n").split("\t") for line in list(f)[1:20_001]]
    data = (tmp_path / "ml-1m" / "movies.dat").read_bytes()
    assert b"Mis\xe9rables, Les (1995)::" in data

    files = conf.raw_files("ml1m", tmp_path)
    raw = conf.read(files)
    assert raw["ratings"].rows_read == 20_000
    assert raw["users"].rows_read == len(users) == 943
    assert raw["movies"].rows_read == 1682
    movies = raw["movies"].table.to_pandas()
    assert movies.loc[movies["MovieID"] == "543", "Title"].item() == "Misérables, Les (1995)"
    assert movies.loc[movies["MovieID"] == "543", "Genres"].item() == "Drama|Musical"

    params = conf.params("ml1m", "ingestion")
    result = ADAPTERS[params["adapter"]](raw, params["options"])
    table = result.table
    assert result.quarantine.frame().empty
    assert len(table) == 20_000
    np.testing.assert_array_equal(table["item"].to_numpy(dtype=np.int64), [int(r[1]) for r in inter])
    np.testing.assert_array_equal(table["label"].to_numpy(dtype=np.int64), [int(int(r[2]) >= 4) for r in inter])
    first = table.drop_duplicates("item")
    for item, year in zip(first["item"].tolist(), first["year"].tolist()):
        assert (pd.isna(year) and years[item] is None) or year == years[item], item
    star_wars = table[table["item"] == 50].iloc[0]
    assert list(star_wars["genres"]) == ["Action", "Adventure", "Romance", "Sci-Fi", "War"]
    assert star_wars["year"] == 1977
    by_user = {int(u[0]): u for u in users}
    row = table.iloc[123]
    assert (row["gender"], int(row["age"])) == (by_user[row["user"]][2], int(by_user[row["user"]][1]))


# ------------------------------------------------------------------ advertising logs


@pytest.mark.data_root
def test_criteo_sample(conf, data_root):
    path = data_root / "criteo-sample" / "dac_train_first10000.txt"
    fields = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    result = conf.run("criteo", data_root)
    table = result.table
    assert len(table) == len(fields) == 10_000
    assert int(table["label"].astype("int64").sum()) == sum(f[0] == "1" for f in fields) == 2182
    assert result.quarantine.frame().empty
    for j, name in enumerate(CRITEO_NUMERIC, start=1):
        assert str(table[name].dtype) == "double[pyarrow]", name
        raw = [f[j] for f in fields]
        expected = np.array([float(v) if v else np.nan for v in raw])
        np.testing.assert_array_equal(table[name].to_numpy(dtype=np.float64, na_value=np.nan), expected, err_msg=name)
        assert int(table[name].isna().sum()) == raw.count(""), name
    for j, name in enumerate(CRITEO_CATEGORICAL, start=14):
        raw = [f[j] for f in fields]
        assert int(table[name].isna().sum()) == raw.count(""), name
        assert table[name].dropna().tolist() == [v for v in raw if v], name
    assert int(table["I12"].isna().sum()) > 7000  # I12 is mostly missing in this sample
    np.testing.assert_array_equal(table["source_line"].to_numpy(dtype=np.int64), np.arange(1, 10_001))
    assert result.schema.time_key == "source_line"


@pytest.mark.data_root
def test_avazu_sample(conf, data_root):
    path = data_root / "avazu-sample" / "avazu_train_first8999.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    result = conf.run("avazu", data_root)
    table = result.table
    assert len(table) == len(rows) == 8999
    assert int(table["label"].astype("int64").sum()) == sum(r["click"] == "1" for r in rows) == 1563
    assert result.quarantine.frame().empty
    assert table["id"].tolist() == [r["id"] for r in rows]  # ids beyond int64 kept exactly as text
    # hour 14102100 = 2014-10-21 00:00 UTC, a Tuesday.
    midnight = datetime(2014, 10, 21, tzinfo=timezone.utc)
    assert midnight.weekday() == 1
    assert set(table["timestamp"].tolist()) == {int(midnight.timestamp())}
    assert set(table["hour"].tolist()) == {0}
    assert set(table["weekday"].tolist()) == {1}
    assert "yymmddhh" not in table.columns
    assert table["site_id"].tolist() == [r["site_id"] for r in rows]


IJCAI_ROWS = [
    # full row
    "108641074714126964 3412720377098676069 7908382889764677758;5755694407684602296 "
    "2072967855524022579;5131280576272319091;263639464125433342 1975590437749032870 3948283326616421003 "
    "3 3 4 14 4505772604969228686 0 1003 2002 3006 282924576738839389 1537236544 4016 "
    "5755694407684602296:-1;509660095530134768:-1 6765930309048922341 4 1.0 5002 1.0 1.0 1.0 0",
    # -1 = missing: brand, gender, sales level, service score and the whole prediction list
    "5754713551599725161 3412720377098676069 7908382889764677758;5755694407684602296 "
    "2072967855524022579 -1 3948283326616421003 3 -1 4 14 2642175453151805566 -1 1003 2002 3001 "
    "4007979028023783431 1537243232 4001 -1 6765930309048922341 4 0.983 5002 -1 0.981 0.990 1",
    # one-item lists
    "842679481291040981 3412720377098676069 7908382889764677758 2072967855524022579 1975590437749032870 "
    "3948283326616421003 3 3 4 14 2909189035604458002 1 1004 2005 3003 4884875192608989870 1537211052 "
    "4001 7908382889764677758:2072967855524022579 6765930309048922341 4 1.0 5002 1.0 1.0 1.0 0",
    # same instance_id as the first row: quarantined as a duplicate
    "108641074714126964 2061178479765282001 7908382889764677758;8277336076276184272 "
    "2636395404473730413 2057434437082468733 3948283326616421003 6 7 11 15 4505772604969228686 0 1003 2002 "
    "3006 282924576738839390 1537240000 4001 8277336076276184272:-1 3578063935993919208 16 0.996 5016 0.97 "
    "0.97 0.97 0",
]


def test_ijcai18_space_separated_lists_and_missing(conf, tmp_path):
    folder = tmp_path / "ijcai18"
    folder.mkdir()
    header = IJCAI_HEADER.split(" ")
    assert len(header) == 27 and all(len(r.split(" ")) == 27 for r in IJCAI_ROWS)
    assert set(IJCAI_CATEGORICAL) | set(IJCAI_NUMERIC) <= set(header)
    path = folder / "round1_ijcai_18_train_20180301.txt"
    path.write_text(IJCAI_HEADER + "\n" + "\n".join(IJCAI_ROWS) + "\n", encoding="utf-8")
    result = conf.run("ijcai18", tmp_path)  # conf/ijcai18: sep ' ', missing_values ['-1']
    table = result.table
    assert len(table) == 3
    assert table["instance_id"].tolist() == ["108641074714126964", "5754713551599725161", "842679481291040981"]
    assert table["label"].astype("int64").tolist() == [0, 1, 0]
    assert _lists(table["item_category_list"]) == [
        ["7908382889764677758", "5755694407684602296"],
        ["7908382889764677758", "5755694407684602296"],
        ["7908382889764677758"],
    ]
    assert _lists(table["item_property_list"])[0] == ["2072967855524022579", "5131280576272319091", "263639464125433342"]
    # "-1" as a whole field is missing; "-1" inside a list item is data.
    assert _lists(table["predict_category_property"]) == [
        ["5755694407684602296:-1", "509660095530134768:-1"], [], ["7908382889764677758:2072967855524022579"]
    ]
    assert table["item_brand_id"].isna().tolist() == [False, True, False]
    assert table["user_gender_id"].isna().tolist() == [False, True, False]
    assert table["item_sales_level"].isna().tolist() == [False, True, False]
    assert table["user_id"].tolist()[0] == "4505772604969228686"
    service = table["shop_score_service"].to_numpy(dtype=np.float64, na_value=np.nan)
    assert service[0] == 1.0 and np.isnan(service[1])
    assert table["shop_review_positive_rate"].to_numpy(dtype=np.float64).tolist() == [1.0, 0.983, 1.0]
    for ts, hour, weekday in zip(table["timestamp"], table["hour"], table["weekday"]):
        assert (hour, weekday) == (_utc(ts).hour, _utc(ts).weekday())
    q = result.quarantine.frame()
    assert len(q) == 1
    assert q["line"].tolist() == [5]
    assert q["reason"].item() == "duplicate key: (instance_id)=(108641074714126964) already on line 2"
    assert table["source_line"].tolist() == [2, 3, 4]


@pytest.mark.data_root
def test_ijcai18_written_from_movielens_100k(conf, data_root, tmp_path):
    """20,000 real ML-100K ratings as an IJCAI-18 file: every row kept, fields traced to
    their rating, user and movie."""
    typed = data_root / "movielens-100k"
    written = write_ijcai18(typed, tmp_path / LAYOUT["ijcai18"], rows=20_000)
    with (typed / "ml-100k.inter").open(encoding="utf-8") as f:
        inter = [line.rstrip("\n").split("\t") for line in list(f)[1:20_001]]
    with (typed / "ml-100k.user").open(encoding="utf-8") as f:
        users = {int(p[0]): p for p in (line.rstrip("\n").split("\t") for line in list(f)[1:])}
    with (typed / "ml-100k.item").open(encoding="utf-8") as f:
        movies = {int(p[0]): p for p in (line.rstrip("\n").split("\t") for line in list(f)[1:])}
    path = tmp_path / "ijcai18" / "round1_ijcai_18_train_20180301.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == IJCAI_HEADER and len(lines) == 20_001
    assert all(len(line.split(" ")) == 27 for line in lines)
    assert written.columns.tolist() == IJCAI_HEADER.split(" ") and len(written) == 20_000

    result = conf.run("ijcai18", tmp_path)
    table = result.table
    assert result.quarantine.frame().empty
    assert result.quarantine.set_missing == {}
    assert len(table) == 20_000
    np.testing.assert_array_equal(table["source_line"].to_numpy(dtype=np.int64), np.arange(2, 20_002))
    assert table["instance_id"].tolist() == [str(n) for n in range(1, 20_001)]
    assert table["user_id"].tolist() == [r[0] for r in inter]
    assert table["item_id"].tolist() == [r[1] for r in inter]
    labels = [int(float(r[2]) >= 4) for r in inter]
    assert table["label"].astype("int64").tolist() == labels
    assert 0.4 < sum(labels) / len(labels) < 0.7  # about 55% of ML-100K ratings are >= 4
    ts = [int(r[3]) for r in inter]
    assert table["timestamp"].astype("int64").tolist() == ts
    hours = [_utc(t).hour for t in ts]
    assert table["hour"].astype("int64").tolist() == hours
    assert table["weekday"].astype("int64").tolist() == [_utc(t).weekday() for t in ts]
    assert table["context_page_id"].tolist() == [str(4001 + h % 20) for h in hours]
    # Genre ids map back to the movie's genres, in the typed file's order.
    genre_of = {v: k for k, v in IJCAI_GENRE_IDS.items()}
    assert len(genre_of) == len(IJCAI_GENRE_IDS)  # no two genres share an id
    categories = _lists(table["item_category_list"])
    expected_genres = [movies[int(r[1])][3].split(" ") for r in inter]
    assert [[genre_of[c] for c in cats] for cats in categories] == expected_genres
    # No year -> "-1" -> empty property list; with a year: its year and decade ids.
    no_year = [not movies[int(r[1])][2].isdigit() for r in inter]
    assert [len(p) == 0 for p in _lists(table["item_property_list"])] == no_year
    assert {len(p) for p, n in zip(_lists(table["item_property_list"]), no_year) if not n} == {2}
    predict = _lists(table["predict_category_property"])
    assert [[p.split(":")[0] for p in row] for row in predict] == categories
    assert any(no_year)  # items 267 and 1412 have no year: "genre:-1" items, kept as data
    assert all(p.endswith(":-1") == n for row, n in zip(predict, no_year) for p in row)
    # User codes from the user file: F=0/M=1, 1000 + decade of age, 2000 + index of the
    # occupation name; foreign (non-numeric) zips give a missing star level.
    occupations = sorted({u[3] for u in users.values()})
    of_row = [users[int(r[0])] for r in inter]
    assert table["user_gender_id"].tolist() == [{"F": "0", "M": "1"}[u[2]] for u in of_row]
    assert table["user_age_level"].tolist() == [str(1000 + int(u[1]) // 10) for u in of_row]
    assert table["user_occupation_id"].tolist() == [str(2000 + occupations.index(u[3])) for u in of_row]
    foreign = [not u[4][0].isdigit() for u in of_row]
    assert table["user_star_level"].isna().tolist() == foreign and any(foreign)
    # Item- and shop-derived fields are constant per item; unscored shops are missing.
    per_item_fields = ["item_brand_id", "shop_id", "item_price_level", "shop_score_service"]
    per_item = table.groupby("item_id")[per_item_fields].nunique(dropna=False)
    assert (per_item == 1).all().all()
    service = table["shop_score_service"].to_numpy(dtype=np.float64, na_value=np.nan)
    assert np.isnan(service).any() and np.nanmin(service) >= 0.9 and np.nanmax(service) <= 1.0
    assert result.schema.user_key == "user_id" and result.schema.item_key == "item_id"


# ------------------------------------------------------------------ generic


GENERIC_SCHEMA = {
    "label": "clicked",
    "categorical": ["userId", "movieId"],
    "numeric": ["rating"],
    "multi_valued": {"genres": "|"},
    "user_key": "userId",
    "item_key": "movieId",
    "time_key": "timestamp",
    "time_features": True,
    "unique_key": ["userId", "movieId"],
    "key_columns": ["userId", "movieId"],
    "sources": {"movieId": "item", "genres": "item"},
}


@pytest.fixture(scope="module")
def generic_source(shipped) -> pd.DataFrame:
    """3,000 shipped ratings with a 0/1 label and the movie's genres; one duplicate appended."""
    ratings = pd.read_csv(shipped / "ratings.csv", nrows=3000)
    movies = pd.read_csv(shipped / "movies.csv")
    frame = ratings.merge(movies[["movieId", "genres"]], on="movieId", how="left")
    frame.insert(2, "clicked", (frame["rating"] >= 4).astype("int64"))
    return pd.concat([frame, frame.iloc[[17]]], ignore_index=True)


def _check_generic(result, source: pd.DataFrame) -> None:
    table = result.table
    n = len(source) - 1
    assert len(table) == n
    assert table["label"].astype("int64").tolist() == source["clicked"].iloc[:n].tolist()
    assert table["userId"].tolist() == source["userId"].iloc[:n].astype(str).tolist()
    assert table["rating"].to_numpy(dtype=np.float64).tolist() == source["rating"].iloc[:n].tolist()
    assert _lists(table["genres"]) == [g.split("|") for g in source["genres"].iloc[:n]]
    ts = source["timestamp"].iloc[:n].to_numpy()
    np.testing.assert_array_equal(table["hour"].to_numpy(dtype=np.int64), (ts // 3600) % 24)
    q = result.quarantine.frame()
    assert len(q) == 1 and q["reason"].item().startswith("duplicate key: (userId,movieId)=(1,")
    assert result.schema.categorical == ("userId", "movieId", "hour", "weekday")
    assert result.schema.multi_valued == ("genres",)
    assert result.schema.source_of("genres") == "item"


def test_generic_csv(generic_source, tmp_path):
    path = tmp_path / "clicks.csv"
    generic_source.to_csv(path, index=False)
    raw = read_raw(RawFileConfig(str(path)))
    result = ADAPTERS["generic"]({"table": raw}, {"schema": GENERIC_SCHEMA})
    _check_generic(result, generic_source)
    q = result.quarantine.frame()
    assert q["line"].tolist() == [len(generic_source) + 1]  # the appended row, after the header
    assert f"already on line {17 + 2}" in q["reason"].item()


@pytest.mark.parametrize("genres_as", ["list", "joined"], ids=["parquet-list-column", "parquet-joined-text"])
def test_generic_parquet_equals_csv(generic_source, tmp_path, genres_as):
    frame = generic_source.copy()
    if genres_as == "list":
        frame["genres"] = frame["genres"].str.split("|")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "clicks.parquet")
    generic_source.to_csv(tmp_path / "clicks.csv", index=False)
    from_parquet = ADAPTERS["generic"](
        {"table": read_raw(RawFileConfig(str(tmp_path / "clicks.parquet"), format="parquet"))}, {"schema": GENERIC_SCHEMA}
    )
    from_csv = ADAPTERS["generic"]({"table": read_raw(RawFileConfig(str(tmp_path / "clicks.csv")))}, {"schema": GENERIC_SCHEMA})
    _check_generic(from_parquet, generic_source)
    columns = [c for c in from_csv.table.columns if c != "source_line"]
    pd.testing.assert_frame_equal(from_parquet.table[columns], from_csv.table[columns])
    # Parquet rows are numbered from 1, CSV lines from 2 (after the header).
    np.testing.assert_array_equal(
        from_parquet.table["source_line"].to_numpy() + 1, from_csv.table["source_line"].to_numpy()
    )


def test_generic_needs_a_label(generic_source, tmp_path):
    generic_source.to_csv(tmp_path / "clicks.csv", index=False)
    raw = read_raw(RawFileConfig(str(tmp_path / "clicks.csv")))
    with pytest.raises(ValueError, match=r"ingestion\.options\.schema\.label is required"):
        ADAPTERS["generic"]({"table": raw}, {"schema": {"categorical": ["userId"]}})
