"""Writers of REAL MovieLens-100K rows in the other raw formats the adapters read.

The external data root holds MovieLens-100K only in RecBole's typed-header layout
(``movielens-100k/ml-100k.inter/.user/.item``); MovieLens-1M and IJCAI-18 are too large
to bring in and GroupLens' ``u.*`` files may not be redistributed. These functions
rewrite the typed files into GroupLens' ``u.*`` layout, MovieLens-1M's ``.dat`` files
and an IJCAI-18 round-1 training file, so adapter tests and whole-pipeline runs
(``kedro run --env ml100k_grouplens|ml1m|ijcai18``) work on real rows. They write into
a folder the caller chooses (a ``tmp_path``), never into the repository.

Where the environments' catalogs look, relative to ``${globals:data_root}``:

- ``ml100k_grouplens``: ``ml-100k/u.data``, ``u.user``, ``u.item``  -> :func:`write_grouplens_100k`
- ``ml1m``: ``ml-1m/ratings.dat``, ``users.dat``, ``movies.dat``  -> :func:`write_ml1m`
- ``ijcai18``: ``ijcai18/round1_ijcai_18_train_20180301.txt``  -> :func:`write_ijcai18`

so ``write_all(typed, root)`` (or each writer with the paths in :data:`LAYOUT`) makes
``DYNAMIC_CTR_DATA_ROOT=<root>`` find them.

Import from any test folder with ``from formats import ...``: ``tests/`` has a
``conftest.py`` and no ``__init__.py``, so pytest's default ``prepend`` import mode puts
``tests/`` on ``sys.path`` before any test module is imported.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pandas as pd

#: GroupLens' genre flag order in ``u.item`` (and ``u.genre``).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]

#: Where each environment's catalog reads its raw files, relative to the data root.
LAYOUT = {
    "ml100k_grouplens": "ml-100k",
    "ml1m": "ml-1m",
    "ijcai18": "ijcai18/round1_ijcai_18_train_20180301.txt",
}

#: The 27 columns of IJCAI-18's round-1 training file, in the file's order.
IJCAI_HEADER = (
    "instance_id item_id item_category_list item_property_list item_brand_id item_city_id item_price_level "
    "item_sales_level item_collected_level item_pv_level user_id user_gender_id user_age_level "
    "user_occupation_id user_star_level context_id context_timestamp context_page_id "
    "predict_category_property shop_id shop_review_num_level shop_review_positive_rate shop_star_level "
    "shop_score_service shop_score_delivery shop_score_description is_trade"
)


def _ijcai_id(kind: str, value: object) -> str:
    """A stable 63-bit decimal id, like IJCAI-18's hashed ids (same on every machine and
    Python version, unlike ``hash``)."""
    digest = hashlib.sha256(f"{kind}:{value}".encode()).digest()
    return str(int.from_bytes(digest[:8], "big") >> 1)


#: Genre -> category id written in ``item_category_list``; tests invert it.
IJCAI_GENRE_IDS = {g: _ijcai_id("genre", g) for g in ML100K_GENRES}


def _typed_rows(path: Path) -> list[list[str]]:
    """Fields of a typed-header file's data lines (the header is dropped)."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]


# ------------------------------------------------------------------ GroupLens u.*


def write_grouplens_100k(typed: Path, out: Path) -> dict[int, str]:
    """GroupLens' ``u.data``/``u.user``/``u.item`` (all 100,000 ratings) from the typed files.

    ``typed`` is the ``movielens-100k`` folder; ``out`` the folder to write (for the
    ``ml100k_grouplens`` environment: ``<data root>/ml-100k``). ``u.item`` is Latin-1 with
    the year put back into the title and a release date, as GroupLens ships it.

    Returns the titles written, by item."""
    out.mkdir(parents=True, exist_ok=True)
    inter = (typed / "ml-100k.inter").read_text(encoding="utf-8").splitlines()[1:]
    (out / "u.data").write_text("".join(line + "\n" for line in inter), encoding="ascii")
    users = (typed / "ml-100k.user").read_text(encoding="utf-8").splitlines()[1:]
    (out / "u.user").write_text("".join(line.replace("\t", "|") + "\n" for line in users), encoding="ascii")
    titles: dict[int, str] = {}
    lines = []
    for item, title, year, classes in _typed_rows(typed / "ml-100k.item"):
        genres = classes.split(" ")
        if not set(genres) <= set(ML100K_GENRES):  # a genre without a flag would vanish silently
            raise ValueError(f"item {item}: genres {genres} not all in GroupLens' flag list")
        flags = ["1" if g in genres else "0" for g in ML100K_GENRES]
        if year.isdigit():
            title, release = f"{title} ({year})", f"01-Jan-{year}"
        else:
            release = ""
        titles[int(item)] = title
        url = f"http://us.imdb.com/M/title-exact?{title.replace(' ', '%20')}"
        lines.append("|".join([item, title, release, "", url, *flags]) + "\n")
    (out / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return titles


# ------------------------------------------------------------------ MovieLens-1M .dat


class ML1MWritten(NamedTuple):
    """What :func:`write_ml1m` wrote, as typed-file fields, for the caller's checks."""

    #: ``[user, item, rating, timestamp]`` of each ``ratings.dat`` line, in order.
    inter: list[list[str]]
    #: ``[user, age, gender, occupation, zip]`` of each user (occupation as a name).
    users: list[list[str]]
    #: Release year by item (``None`` where the typed file has none).
    years: dict[int, int | None]
    #: Occupation names in the order of their ML-1M integer codes.
    occupations: list[str]


def write_ml1m(typed: Path, out: Path, rows: int = 20_000) -> ML1MWritten:
    """MovieLens-1M's ``ratings.dat``/``users.dat``/``movies.dat`` (``::``, Latin-1) from
    the first ``rows`` ratings, all users and all movies of the typed files.

    ``out`` is the folder to write (for the ``ml1m`` environment: ``<data root>/ml-1m``).
    Users are written as ML-1M orders them (``UserID::Gender::Age::Occupation::Zip``),
    occupations as integer codes; movie titles carry their year and genres are
    ``|``-joined, as in ML-1M."""
    out.mkdir(parents=True, exist_ok=True)
    inter = _typed_rows(typed / "ml-100k.inter")[:rows]
    (out / "ratings.dat").write_bytes("".join("::".join(r) + "\n" for r in inter).encode("latin-1"))
    users = _typed_rows(typed / "ml-100k.user")
    occupations = sorted({u[3] for u in users})  # ML-1M codes occupations as integers
    (out / "users.dat").write_bytes(
        "".join(f"{u}::{g}::{a}::{occupations.index(o)}::{z}\n" for u, a, g, o, z in users).encode("latin-1")
    )
    years: dict[int, int | None] = {}
    movie_lines = []
    for item, title, year, classes in _typed_rows(typed / "ml-100k.item"):
        years[int(item)] = int(year) if year.isdigit() else None
        full = f"{title} ({year})" if year.isdigit() else title
        movie_lines.append(f"{item}::{full}::{classes.replace(' ', '|')}\n")
    (out / "movies.dat").write_bytes("".join(movie_lines).encode("latin-1"))
    return ML1MWritten(inter, users, years, occupations)


# ------------------------------------------------------------------ IJCAI-18


def _shop_score(shop: int, k: int) -> str:
    """A score in [0.9, 1.0] of the shop; ``-1`` (unscored) for every 31st shop."""
    return "-1" if shop % 31 == 0 else f"{0.9 + (shop * k % 101) / 1000:.3f}"


def write_ijcai18(typed: Path, out_file: Path, rows: int = 20_000) -> pd.DataFrame:
    """An IJCAI-18 round-1 training file from the first ``rows`` ML-100K ratings.

    ``out_file`` is the file to write (for the ``ijcai18`` environment:
    ``<data root>/ijcai18/round1_ijcai_18_train_20180301.txt``). Space-separated with a
    header line (:data:`IJCAI_HEADER`), ``-1`` for missing, ``;``-separated lists.

    Real fields: ``instance_id`` = line number - 1 (unique), ``item_id``/``user_id`` =
    the MovieLens ids, ``is_trade`` = rating >= 4, ``context_timestamp`` = the rating's
    time, ``context_id`` = an id of (user, second), i.e. one page view,
    ``context_page_id`` = 4001 + UTC hour % 20, ``item_category_list`` = the movie's
    genres (:data:`IJCAI_GENRE_IDS`, typed-file order), ``item_property_list`` = year and
    decade ids (``-1`` without a year), ``predict_category_property`` = ``genre:year``
    per genre (``genre:-1`` without a year), ``user_gender_id`` F=0 M=1,
    ``user_age_level`` = 1000 + age // 10, ``user_occupation_id`` = 2000 + the
    occupation's sorted index, ``user_star_level`` = 3000 + the zip's first digit (``-1``
    for the foreign, non-numeric zips), ``item_sales_level`` = bit length of the item's
    rating count in the rows written (popularity, not its label).

    Derived from the item id only, so constant per item: brand (``-1`` without a
    year), city, price/collected/pv levels, and a shop (``item % 211``) with review and
    star levels and scores in [0.9, 1.0] (``-1`` scores for every 31st shop, as shops
    too new to be scored).

    Returns the rows written: the 27 columns as the text in the file."""
    inter = _typed_rows(typed / "ml-100k.inter")[:rows]
    users = {int(u[0]): u for u in _typed_rows(typed / "ml-100k.user")}
    occupations = sorted({u[3] for u in users.values()})
    items: dict[int, tuple[list[str], int | None]] = {}
    for item, _title, year, classes in _typed_rows(typed / "ml-100k.item"):
        items[int(item)] = (classes.split(" "), int(year) if year.isdigit() else None)
    popularity = Counter(int(r[1]) for r in inter)

    header = IJCAI_HEADER.split(" ")
    out_rows: list[list[str]] = []
    for n, (u, i, rating, ts) in enumerate(inter, start=1):
        user, item, seconds = int(u), int(i), int(float(ts))
        genres, year = items[item]
        _, age, gender, occupation, zip_code = users[user]
        genre_ids = [IJCAI_GENRE_IDS[g] for g in genres]
        year_id = _ijcai_id("year", year) if year is not None else "-1"
        properties = [year_id, _ijcai_id("decade", year // 10 * 10)] if year is not None else ["-1"]
        shop = item % 211
        fields = {
            "instance_id": str(n),
            "item_id": str(item),
            "item_category_list": ";".join(genre_ids),
            "item_property_list": ";".join(properties),
            "item_brand_id": _ijcai_id("brand", item % 97) if year is not None else "-1",
            "item_city_id": _ijcai_id("city", item % 13),
            "item_price_level": str(item % 10),
            "item_sales_level": str(popularity[item].bit_length()),
            "item_collected_level": str(item * 7 % 18),
            "item_pv_level": str(15 + item % 6),
            "user_id": str(user),
            "user_gender_id": {"F": "0", "M": "1"}[gender],
            "user_age_level": str(1000 + int(age) // 10),
            "user_occupation_id": str(2000 + occupations.index(occupation)),
            "user_star_level": str(3000 + int(zip_code[0])) if zip_code[:1].isdigit() else "-1",
            "context_id": _ijcai_id("context", f"{user}:{seconds}"),
            "context_timestamp": str(seconds),
            "context_page_id": str(4001 + (seconds // 3600 % 24) % 20),
            "predict_category_property": ";".join(f"{g}:{year_id}" for g in genre_ids),
            "shop_id": _ijcai_id("shop", shop),
            "shop_review_num_level": str(shop % 25),
            "shop_review_positive_rate": f"{1 - (shop % 40) / 1000:.3f}",
            "shop_star_level": str(5000 + shop % 21),
            "shop_score_service": _shop_score(shop, 3),
            "shop_score_delivery": _shop_score(shop, 7),
            "shop_score_description": _shop_score(shop, 11),
            "is_trade": "1" if float(rating) >= 4 else "0",
        }
        out_rows.append([fields[c] for c in header])
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(
        IJCAI_HEADER + "\n" + "".join(" ".join(r) + "\n" for r in out_rows), encoding="utf-8"
    )
    return pd.DataFrame(out_rows, columns=header)


# ------------------------------------------------------------------ all at once


def write_all(typed: Path, root: Path, rows: int = 20_000) -> None:
    """Every format above under ``root`` where the environments' catalogs look
    (:data:`LAYOUT`), so ``DYNAMIC_CTR_DATA_ROOT=root`` serves ``ml100k_grouplens``,
    ``ml1m`` and ``ijcai18``. ``rows`` limits ML-1M and IJCAI-18 (u.data is all 100K)."""
    write_grouplens_100k(typed, root / LAYOUT["ml100k_grouplens"])
    write_ml1m(typed, root / LAYOUT["ml1m"], rows)
    write_ijcai18(typed, root / LAYOUT["ijcai18"], rows)
