"""Adapters: one function per raw format, from raw files to one clean, typed table.

An adapter takes the raw files (``name -> RawTable``, as loaded by the catalog's
``RawSourceDataset``) and its options, and returns an :class:`AdapterResult`: the
clean table (Arrow-backed dtypes, label ``int8`` 0/1, ``source_line`` kept for
tracing), its :class:`~dynamic_ctr.data.schema.TableSchema`, and the quarantine.
Adding a format is one function registered in :data:`ADAPTERS` plus a catalog entry.

Formats: MovieLens latest (CSV), MovieLens-100K (GroupLens' ``u.*`` layout or the
typed-header ``ml-100k.*`` layout), MovieLens-1M (``::``-separated ``.dat``, Latin-1),
Criteo DAC (TSV), Avazu (CSV), IJCAI-18 (space-separated) and a generic CSV/Parquet
file described by a schema in the parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dynamic_ctr.data.raw import RawInputError, RawTable
from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.data.validation import (
    Column,
    Quarantine,
    quarantine_dangling,
    quarantine_duplicates,
    type_columns,
)

RawFiles = dict[str, RawTable | None]


@dataclass
class AdapterResult:
    """What an adapter returns.

    Attributes:
        table: the clean rows; one row per kept row of the main file.
        schema: roles of ``table``'s columns.
        quarantine: rows set aside, with file, line and reason.
        main_file: the file whose rows become the table's rows.
        notes: counts worth reporting that are not row losses (e.g. unused tags).
        unique_key: the columns whose values identify a row of the main file: a later row
            with the same values was quarantined as a duplicate, the adapter's last check
            (empty: no such key). The streaming pipeline finds the duplicates across
            batches by it.
    """

    table: pd.DataFrame
    schema: TableSchema
    quarantine: Quarantine
    main_file: str
    notes: dict[str, int] = field(default_factory=dict)
    unique_key: tuple[str, ...] = ()


def _need(files: RawFiles, name: str, adapter: str) -> RawTable:
    raw = files.get(name)
    if raw is None:
        raise RawInputError(
            f"adapter {adapter!r} needs the raw file {name!r}; the catalog's raw_source has {sorted(k for k, v in files.items() if v is not None)}"
        )
    return raw


def _time_features(frame: pd.DataFrame, seconds: str) -> pd.DataFrame:
    """Hour of day and weekday (UTC) from a unix-seconds column, as small ints."""
    when = pd.to_datetime(frame[seconds].astype("int64"), unit="s", utc=True)
    return frame.assign(
        hour=when.dt.hour.astype("int64[pyarrow]"), weekday=when.dt.day_of_week.astype("int64[pyarrow]")
    )


def _label_from_rating(frame: pd.DataFrame, threshold: float) -> pd.Series:
    return (frame["rating"] >= threshold).astype("int8[pyarrow]")


# --------------------------------------------------------------------------- MovieLens

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_NO_GENRES = "(no genres listed)"


def _year_from_title(titles: pd.Series) -> pd.Series:
    years = titles.astype(str).str.extract(_YEAR_IN_TITLE, expand=False)
    return pd.to_numeric(years, errors="coerce").astype("int64[pyarrow]")


def _movielens(
    ratings: pd.DataFrame,
    movies: pd.DataFrame,
    paths: dict[str, str],
    quarantine: Quarantine,
    options: dict[str, Any],
    users: pd.DataFrame | None = None,
    tags: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, TableSchema, dict[str, int]]:
    """Join typed MovieLens frames (columns user, item, rating, timestamp / item, year,
    genres / user, ... / user, item, tag) into the clean table, checking keys."""
    low, high = options.get("rating_range", (0.5, 5.0))
    out_of_range = ~ratings["rating"].between(low, high)
    if out_of_range.any():
        bad = ratings[out_of_range]
        quarantine.add(
            paths["ratings"],
            bad["source_line"].to_numpy(),
            [f"bad rating: rating={r} outside [{low}, {high}]" for r in bad["rating"]],
            bad.drop(columns="source_line").astype(str).agg(",".join, axis=1).tolist(),
        )
        ratings = ratings[~out_of_range].reset_index(drop=True)
    movies = quarantine_duplicates(movies, ["item"], paths["movies"], quarantine)
    ratings = quarantine_duplicates(ratings, ["user", "item"], paths["ratings"], quarantine)
    ratings = quarantine_dangling(ratings, "item", movies["item"], paths["ratings"], paths["movies"], quarantine)
    table = ratings.merge(movies.drop(columns="source_line"), on="item", how="left")
    categorical = ["user", "item", "year", "hour", "weekday"]
    sources = {"user": "user", "item": "item", "year": "item", "genres": "item", "tags": "item"}
    numeric: list[str] = []
    if users is not None:
        users = quarantine_duplicates(users, ["user"], paths["users"], quarantine)
        table = quarantine_dangling(table, "user", users["user"], paths["ratings"], paths["users"], quarantine)
        user_cols = [c for c in users.columns if c not in ("user", "source_line")]
        table = table.merge(users.drop(columns="source_line"), on="user", how="left")
        categorical += [c for c in user_cols if c != "age"]
        numeric += ["age"] if "age" in user_cols else []
        sources.update({c: "user" for c in user_cols})
    notes: dict[str, int] = {}
    multi = ["genres"]
    aggregated: list[str] = []
    if tags is not None:
        tags = quarantine_dangling(tags, "item", movies["item"], paths["tags"], paths["movies"], quarantine)
        per_pair = tags.groupby(["user", "item"], sort=False)["tag"].agg(list)
        rated = pd.MultiIndex.from_frame(table[["user", "item"]])
        notes["tags_without_a_rating"] = int((~per_pair.index.isin(rated)).sum())
        pair_tags = per_pair.rename("tags").reset_index()
        table = table.merge(pair_tags, on=["user", "item"], how="left")
        table["tags"] = pd.array(
            [t if isinstance(t, list) else [] for t in table["tags"]], dtype=pd.ArrowDtype(pa.list_(pa.string()))
        )
        multi.append("tags")
        aggregated.append("tags")
    table = _time_features(table, "timestamp")
    table["label"] = _label_from_rating(table, float(options.get("label_threshold", 4.0)))
    schema = TableSchema(
        categorical=tuple(categorical),
        numeric=tuple(numeric),
        multi_valued=tuple(multi),
        user_key="user",
        item_key="item",
        time_key="timestamp",
        item_aggregated=tuple(aggregated),
        sources={k: v for k, v in sources.items() if k in table.columns},
        key_columns=("user", "item", "timestamp"),
    )
    columns = ["label", *schema.features, "timestamp", "rating", "source_line"]
    return table[columns], schema, notes


def _genres_without_placeholder(movies: pd.DataFrame) -> pd.DataFrame:
    genres = movies["genres"].list.flatten()
    if not (genres == _NO_GENRES).any():
        return movies
    cleaned = [[g for g in gs if g != _NO_GENRES] for gs in movies["genres"].tolist()]
    return movies.assign(genres=pd.array(cleaned, dtype=pd.ArrowDtype(pa.list_(pa.string()))))


def movielens_latest(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """MovieLens latest(-small): ``ratings``, ``movies`` and optional ``tags`` CSVs."""
    q = Quarantine()
    ratings_raw, movies_raw = _need(files, "ratings", "movielens_latest"), _need(files, "movies", "movielens_latest")
    ratings = type_columns(
        ratings_raw,
        [Column("userId", "int", True, rename="user"), Column("movieId", "int", True, rename="item"),
         Column("rating", "float", True), Column("timestamp", "int", True)],
        q,
    )
    movies = type_columns(
        movies_raw,
        [Column("movieId", "int", True, rename="item"), Column("title", "str"), Column("genres", "list", sep="|")],
        q,
    )
    movies = _genres_without_placeholder(movies.assign(year=_year_from_title(movies["title"]))).drop(columns="title")
    paths = {"ratings": ratings_raw.path, "movies": movies_raw.path}
    tags = None
    if files.get("tags") is not None:
        tags_raw = files["tags"]
        assert tags_raw is not None
        tags = type_columns(
            tags_raw,
            [Column("userId", "int", True, rename="user"), Column("movieId", "int", True, rename="item"),
             Column("tag", "str", True), Column("timestamp", "int", rename="tag_time")],
            q,
        )
        paths["tags"] = tags_raw.path
    table, schema, notes = _movielens(ratings, movies, paths, q, options, tags=tags)
    return AdapterResult(table, schema, q, ratings_raw.path, notes)


_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_USER_COLUMNS = [Column("age", "int", True), Column("gender", "str", True), Column("occupation", "str", True)]


def movielens_100k(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """MovieLens-100K with demographics, in GroupLens' layout (``u.data``, ``u.user``,
    ``u.item``; option ``layout: grouplens``) or the typed-header layout
    (``ml-100k.inter``, ``.user``, ``.item``; ``layout: typed``)."""
    q = Quarantine()
    layout = options.get("layout", "grouplens")
    ratings_raw = _need(files, "ratings", "movielens_100k")
    users_raw = _need(files, "users", "movielens_100k")
    movies_raw = _need(files, "movies", "movielens_100k")
    if layout == "grouplens":
        ids = ("user_id", "item_id", "rating", "timestamp")
        user_id, item_id = "user_id", "movie_id"
    elif layout == "typed":
        ids = ("user_id", "item_id", "rating", "timestamp")
        user_id, item_id = "user_id", "item_id"
    else:
        raise ValueError(f"movielens_100k: unknown layout {layout!r} (use 'grouplens' or 'typed')")
    ratings = type_columns(
        ratings_raw,
        [Column(ids[0], "int", True, rename="user"), Column(ids[1], "int", True, rename="item"),
         Column("rating", "float", True), Column("timestamp", "int", True)],
        q,
    )
    users = type_columns(
        users_raw,
        [Column(user_id, "int", True, rename="user"), *_USER_COLUMNS, Column("zip_code", "str", rename="zip")],
        q,
    )
    if layout == "grouplens":
        flags = [Column(g, "int", True) for g in _ML100K_GENRES]
        movies = type_columns(movies_raw, [Column(item_id, "int", True, rename="item"), Column("release_date"), *flags], q)
        flag_matrix = movies[list(_ML100K_GENRES)].to_numpy(dtype=np.int64) == 1
        genres = [[g for g, on in zip(_ML100K_GENRES, row) if on] for row in flag_matrix]
        years = pd.to_numeric(movies["release_date"].astype(str).str[-4:], errors="coerce").astype("int64[pyarrow]")
        movies = pd.DataFrame(
            {"item": movies["item"], "year": years,
             "genres": pd.array(genres, dtype=pd.ArrowDtype(pa.list_(pa.string()))),
             "source_line": movies["source_line"]}
        )
    else:
        movies = type_columns(
            movies_raw,
            [Column(item_id, "int", True, rename="item"), Column("release_year", "int", rename="year", invalid="missing"),
             Column("class", "list", sep=" ", rename="genres")],
            q,
        )
    paths = {"ratings": ratings_raw.path, "movies": movies_raw.path, "users": users_raw.path}
    table, schema, notes = _movielens(ratings, movies, paths, q, options, users=users)
    return AdapterResult(table, schema, q, ratings_raw.path, notes)


def movielens_1m(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """MovieLens-1M: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``, Latin-1)."""
    q = Quarantine()
    ratings_raw = _need(files, "ratings", "movielens_1m")
    users_raw = _need(files, "users", "movielens_1m")
    movies_raw = _need(files, "movies", "movielens_1m")
    ratings = type_columns(
        ratings_raw,
        [Column("UserID", "int", True, rename="user"), Column("MovieID", "int", True, rename="item"),
         Column("Rating", "float", True, rename="rating"), Column("Timestamp", "int", True, rename="timestamp")],
        q,
    )
    users = type_columns(
        users_raw,
        [Column("UserID", "int", True, rename="user"), Column("Gender", "str", True, rename="gender"),
         Column("Age", "int", True, rename="age"), Column("Occupation", "str", True, rename="occupation"),
         Column("Zip-code", "str", rename="zip")],
        q,
    )
    movies = type_columns(
        movies_raw,
        [Column("MovieID", "int", True, rename="item"), Column("Title", "str", rename="title"),
         Column("Genres", "list", sep="|", rename="genres")],
        q,
    )
    movies = movies.assign(year=_year_from_title(movies["title"])).drop(columns="title")
    paths = {"ratings": ratings_raw.path, "movies": movies_raw.path, "users": users_raw.path}
    table, schema, notes = _movielens(ratings, movies, paths, q, options, users=users)
    return AdapterResult(table, schema, q, ratings_raw.path, notes)


# ------------------------------------------------------------------ advertising logs

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL)


def criteo(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """Criteo DAC: tab-separated ``label I1..I13 C1..C26``, no header, empty = missing.
    Rows are in time order, so ``source_line`` serves as the time key."""
    q = Quarantine()
    raw = _need(files, "clicks", "criteo")
    columns = [Column("label", "label", True), *(Column(c, "float") for c in CRITEO_NUMERIC),
               *(Column(c, "str") for c in CRITEO_CATEGORICAL)]
    table = type_columns(raw, columns, q)
    schema = TableSchema(
        categorical=CRITEO_CATEGORICAL, numeric=CRITEO_NUMERIC, time_key="source_line",
        key_columns=("source_line",),
    )
    return AdapterResult(table, schema, q, raw.path)


AVAZU_CATEGORICAL = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)


def avazu(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """Avazu CTR: CSV with header; ``click`` label, ``hour`` as YYMMDDHH (UTC)."""
    q = Quarantine()
    raw = _need(files, "clicks", "avazu")
    columns = [Column("id", "str", True), Column("click", "label", True, rename="label"),
               Column("hour", "str", True, rename="yymmddhh"), *(Column(c, "str") for c in AVAZU_CATEGORICAL)]
    table = type_columns(raw, columns, q)
    when = pd.to_datetime(table["yymmddhh"].astype(str), format="%y%m%d%H", errors="coerce", utc=True)
    bad = when.isna().to_numpy()
    if bad.any():
        rows = table[bad]
        q.add(raw.path, rows["source_line"].to_numpy(),
              [f"unparsable value: hour={v!r} is not YYMMDDHH" for v in rows["yymmddhh"]],
              rows.astype(str).agg(",".join, axis=1).tolist())
        table, when = table[~bad].reset_index(drop=True), when[~bad].reset_index(drop=True)
    # Unix seconds whatever the datetime resolution (pandas 3 parses to microseconds).
    table["timestamp"] = pd.array(when.dt.as_unit("s").astype("int64"), dtype="int64[pyarrow]")
    table = _time_features(table, "timestamp").drop(columns="yymmddhh")
    table = quarantine_duplicates(table, ["id"], raw.path, q)
    schema = TableSchema(
        categorical=(*AVAZU_CATEGORICAL, "hour", "weekday"), time_key="timestamp",
        sources={"site_id": "item", "app_id": "item", "device_id": "user", "device_ip": "user"},
        key_columns=("id",),
    )
    return AdapterResult(table, schema, q, raw.path, unique_key=("id",))


IJCAI_LISTS = {"item_category_list": ";", "item_property_list": ";", "predict_category_property": ";"}
IJCAI_NUMERIC = ("shop_review_positive_rate", "shop_score_service", "shop_score_delivery", "shop_score_description")
IJCAI_CATEGORICAL = (
    "item_id", "item_brand_id", "item_city_id", "item_price_level", "item_sales_level", "item_collected_level",
    "item_pv_level", "user_id", "user_gender_id", "user_age_level", "user_occupation_id", "user_star_level",
    "context_page_id", "shop_id", "shop_review_num_level", "shop_star_level",
)


def ijcai18(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """IJCAI-18 (Alimama): space-separated with header, ``-1`` = missing, ``;``-lists,
    ``is_trade`` label, ``context_timestamp`` unix seconds. Set ``missing_values: ['-1']``
    on the raw file."""
    q = Quarantine()
    raw = _need(files, "clicks", "ijcai18")
    columns = [Column("instance_id", "str", True), Column("is_trade", "label", True, rename="label"),
               Column("context_timestamp", "int", True, rename="timestamp"),
               *(Column(c, "str") for c in IJCAI_CATEGORICAL), *(Column(c, "float") for c in IJCAI_NUMERIC),
               *(Column(c, "list", sep=s) for c, s in IJCAI_LISTS.items())]
    table = _time_features(type_columns(raw, columns, q), "timestamp")
    table = quarantine_duplicates(table, ["instance_id"], raw.path, q)  # the last check (AdapterResult.unique_key)
    sources = {c: "item" for c in IJCAI_CATEGORICAL if c.startswith(("item", "shop"))}
    sources.update({c: "user" for c in IJCAI_CATEGORICAL if c.startswith("user")})
    sources.update({"item_category_list": "item", "item_property_list": "item"})
    schema = TableSchema(
        categorical=(*IJCAI_CATEGORICAL, "hour", "weekday"), numeric=IJCAI_NUMERIC,
        multi_valued=tuple(IJCAI_LISTS), user_key="user_id", item_key="item_id", time_key="timestamp",
        sources=sources, key_columns=("instance_id",),
    )
    return AdapterResult(table, schema, q, raw.path, unique_key=("instance_id",))


def generic(files: RawFiles, options: dict[str, Any]) -> AdapterResult:
    """Any CSV/Parquet file (raw file ``table``) described by ``options['schema']``:
    ``label`` (0/1 column), ``categorical``, ``numeric``, ``multi_valued`` (column ->
    separator), ``user_key``, ``item_key``, ``time_key`` (unix seconds; adds hour and
    weekday when ``time_features`` is true), ``key_columns``, ``sources``."""
    q = Quarantine()
    raw = _need(files, "table", "generic")
    spec = dict(options.get("schema") or {})
    if "label" not in spec:
        raise ValueError("generic adapter: parameter ingestion.options.schema.label is required")
    multi = dict(spec.get("multi_valued") or {})
    categorical = list(spec.get("categorical") or [])
    numeric = list(spec.get("numeric") or [])
    time_key = spec.get("time_key")
    columns = [Column(spec["label"], "label", True, rename="label")]
    columns += [Column(c, "str", c in (spec.get("user_key"), spec.get("item_key"))) for c in categorical]
    columns += [Column(c, "float") for c in numeric]
    columns += [Column(c, "list", sep=s) for c, s in multi.items()]
    if time_key:
        columns.append(Column(time_key, "int", True))
    extra_keys = [c for c in spec.get("key_columns") or [] if c not in {col.name for col in columns}]
    columns += [Column(c, "str") for c in extra_keys]
    table = type_columns(raw, columns, q)
    if time_key and spec.get("time_features", False):
        table = _time_features(table, time_key)
        categorical += ["hour", "weekday"]
    unique_key = tuple(spec.get("unique_key") or ())
    if unique_key:  # the last check (AdapterResult.unique_key)
        table = quarantine_duplicates(table, list(unique_key), raw.path, q)
    schema = TableSchema(
        categorical=tuple(categorical), numeric=tuple(numeric), multi_valued=tuple(multi),
        user_key=spec.get("user_key"), item_key=spec.get("item_key"), time_key=time_key,
        sources=dict(spec.get("sources") or {}), key_columns=tuple(spec.get("key_columns") or ()),
    )
    return AdapterResult(table, schema, q, raw.path, unique_key=unique_key)


Adapter = Callable[[RawFiles, dict[str, Any]], AdapterResult]

ADAPTERS: dict[str, Adapter] = {
    "movielens_latest": movielens_latest,
    "movielens_100k": movielens_100k,
    "movielens_1m": movielens_1m,
    "criteo": criteo,
    "avazu": avazu,
    "ijcai18": ijcai18,
    "generic": generic,
}


#: Adapters whose checks need no other row than the row itself, or only rows of the same
#: batch, and a duplicate key (``AdapterResult.unique_key``, which the streaming pipeline
#: checks across batches): they can read their main file as a stream (``kedro run
#: --pipeline stream_data``). The value: the raw file streamed.
STREAMABLE: dict[str, str] = {"criteo": "clicks", "avazu": "clicks", "ijcai18": "clicks", "generic": "table"}


def stream_role(name: str) -> str:
    """The raw file an adapter streams."""
    get_adapter(name)
    if name not in STREAMABLE:
        raise ValueError(
            f"ingestion.adapter={name!r} joins several files or checks rows against the whole table, so it cannot "
            f"read its input as a stream; streaming adapters: {sorted(STREAMABLE)}"
        )
    return STREAMABLE[name]


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"parameter ingestion.adapter={name!r} is unknown; known adapters: {sorted(ADAPTERS)}") from None
