"""Malformed raw files, table-driven: every case is a small mutation of a real file.

Each case copies the head of a real raw file (the shipped MovieLens latest-small, or
the Criteo / Avazu samples of the data root) into ``tmp_path``, alters it, reads it
as the project's catalog configures that format, and runs the ``ingest`` node. It
expects EITHER a :class:`RawInputError` whose message names the file and the column
or line, OR a quarantine that accounts for every row (``rows_read == rows_kept +
rows_quarantined`` for each file) with a reason naming the column and value, on the
line of the written file that holds the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dynamic_ctr.data.raw import RawInputError
from dynamic_ctr.pipelines.ingestion.nodes import QuarantineLimitError, check_quarantine, ingest

HEAD = 200  # lines copied from each real file (header included where there is one)

#: Where each environment's raw files come from: role -> (source, lines to copy, optional).
SOURCES: dict[str, dict[str, tuple[str, int | None, bool]]] = {
    "base": {
        "ratings": ("shipped:ratings.csv", HEAD, False),
        "movies": ("shipped:movies.csv", None, False),
        "tags": ("shipped:tags.csv", None, True),
    },
    "criteo": {"clicks": ("root:criteo-sample/dac_train_first10000.txt", HEAD, False)},
    "avazu": {"clicks": ("root:avazu-sample/avazu_train_first8999.csv", HEAD, False)},
}


@dataclass
class Files:
    """The lines of each raw file before writing; a mutation edits them in place."""

    lines: dict[str, list[str | bytes]]
    eol: dict[str, str] = field(default_factory=dict)
    prefix: dict[str, bytes] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)

    def set_field(self, role: str, line: int, column: int, value: str, sep: str) -> None:
        """Set field ``column`` (0-based) of 1-based ``line`` of ``role``."""
        parts = str(self.lines[role][line - 1]).split(sep)
        parts[column] = value
        self.lines[role][line - 1] = sep.join(parts)

    def field_of(self, role: str, line: int, column: int, sep: str) -> str:
        return str(self.lines[role][line - 1]).split(sep)[column]


@dataclass(frozen=True)
class Case:
    """One malformed input.

    ``error``: parts the RawInputError message must hold (``{path}`` = the file of
    ``role``). Otherwise ``line``/``reason``/``value``: the quarantined line of
    ``role``, parts of its reason, and a regular expression the written file's line
    ``line`` matches (``re.search``). ``check`` replaces those for inputs that must work.
    """

    env: str
    mutate: Callable[[Files], None]
    role: str
    error: tuple[str, ...] = ()
    line: int | None = None
    reason: tuple[str, ...] = ()
    value: str | None = None
    check: Callable[[dict[str, Any]], None] | None = None


# ------------------------------------------------------------------ mutations


def _remove(role: str) -> Callable[[Files], None]:
    return lambda f: f.absent.add(role)


def _replace_line(role: str, line: int, text: str | bytes) -> Callable[[Files], None]:
    def mutate(f: Files) -> None:
        f.lines[role][line - 1] = text
    return mutate


def _set(role: str, line: int, column: int, value: str, sep: str = ",") -> Callable[[Files], None]:
    return lambda f: f.set_field(role, line, column, value, sep)


def _all_lines(role: str, fn: Callable[[str], str]) -> Callable[[Files], None]:
    def mutate(f: Files) -> None:
        f.lines[role] = [fn(str(x)) for x in f.lines[role]]
    return mutate


def _latin1_title(f: Files) -> None:
    # A title written in Latin-1 on line 58 of an otherwise UTF-8 movies.csv.
    text = str(f.lines["movies"][57])
    movie_id, rest = text.split(",", 1)
    f.lines["movies"][57] = f"{movie_id},Caf\xe9 Society (2016),Comedy".encode("latin-1")
    assert rest  # the line existed


def _blank_line(f: Files) -> None:
    f.lines["ratings"].insert(100, "")  # the blank line is line 101


def _duplicate_pair(f: Files) -> None:
    user, movie = f.field_of("ratings", 10, 0, ","), f.field_of("ratings", 10, 1, ",")
    f.lines["ratings"][149] = f"{user},{movie},0.5,1000000000"


def _duplicate_movie(f: Files) -> None:
    f.lines["movies"].append("2,Jumanji again (1995),Comedy")  # movieId 2 is on line 3


def _duplicate_avazu_id(f: Files) -> None:
    f.set_field("clicks", 40, 0, f.field_of("clicks", 5, 0, ","), ",")


def _too_few_fields(f: Files) -> None:
    f.lines["clicks"][19] = "\t".join(str(f.lines["clicks"][19]).split("\t")[:30])


def _crlf_too_few_fields(f: Files) -> None:
    _too_few_fields(f)
    f.eol["clicks"] = "\r\n"


def _bom(f: Files) -> None:
    f.prefix["ratings"] = b"\xef\xbb\xbf"


def _header_only(f: Files) -> None:
    f.lines["ratings"] = f.lines["ratings"][:1]


def _empty(f: Files) -> None:
    f.lines["ratings"] = []


# ------------------------------------------------------------------ checks of "ok" cases


def _no_tags(out: dict[str, Any]) -> None:
    clean, quarantine, schema, report = out["clean"], out["quarantine"], out["schema"], out["report"]
    assert quarantine.empty
    assert len(clean) == HEAD - 1
    assert "tags" not in clean.columns and "tags" not in schema["multi_valued"]
    assert not schema["item_aggregated"]
    assert not any(p.endswith("tags.csv") for p in report["files"])


def _bom_read(out: dict[str, Any]) -> None:
    assert out["quarantine"].empty
    assert len(out["clean"]) == HEAD - 1
    assert out["clean"]["user"].iloc[0] == 1


CASES: dict[str, Case] = {
    # ---- errors that name the file and the column or line
    "missing-file": Case("base", _remove("ratings"), "ratings", error=("{path}", "file not found")),
    "missing-column": Case(
        "base", _replace_line("ratings", 1, "userId,movieId,score,timestamp"), "ratings",
        error=("{path}", "missing column(s) ['rating']"),
    ),
    "wrong-separator-semicolon": Case(
        "base", _all_lines("ratings", lambda s: s.replace(",", ";")), "ratings",
        error=("{path}", "line 1", "wrong separator", "splits into 4 fields on ';'"),
    ),
    "criteo-wrong-separator-comma": Case(
        "criteo", _all_lines("clicks", lambda s: s.replace("\t", ",")), "clicks",
        error=("{path}", "line 1", "wrong separator", "splits into 40 fields on ','"),
    ),
    "empty-file": Case("base", _empty, "ratings", error=("{path}", "file is empty")),
    "header-only": Case("base", _header_only, "ratings", error=("{path}", "header but no rows")),
    "non-utf8-bytes-on-line-58": Case(
        "base", _latin1_title, "movies", error=("{path}", "line 58", "not valid UTF-8", "latin-1"),
    ),
    "criteo-wrong-column-list": Case(
        "criteo", _all_lines("clicks", lambda s: s + "\textra"), "clicks",
        error=("{path}", f"{HEAD} of {HEAD} rows do not have 40", "line 1: expected 40 fields, found 41"),
    ),
    # ---- quarantined rows
    "unparsable-int": Case(
        "base", _set("ratings", 42, 1, "12x"), "ratings", line=42,
        reason=("unparsable value", "movieId='12x'", "is not int"), value=r"^\d+,12x,",
    ),
    "unparsable-float": Case(
        "base", _set("ratings", 77, 2, "four"), "ratings", line=77,
        reason=("unparsable value", "rating='four'", "is not float"), value=r"^\d+,\d+,four,\d+$",
    ),
    "missing-required-value": Case(
        "base", _set("ratings", 33, 3, ""), "ratings", line=33,
        reason=("missing value: timestamp is empty",), value=r"^\d+,\d+,[\d.]+,$",
    ),
    "rating-out-of-range": Case(
        "base", _set("ratings", 88, 2, "7.5"), "ratings", line=88,
        reason=("bad rating", "rating=7.5", "outside [0.5, 5.0]"), value=r"^\d+,\d+,7\.5,\d+$",
    ),
    "blank-line-in-the-middle": Case(
        "base", _blank_line, "ratings", line=101, reason=("empty line",), value=r"^$",
    ),
    "duplicate-user-movie": Case(
        "base", _duplicate_pair, "ratings", line=150,
        reason=("duplicate key: (user,item)=(", "already on line 10"), value=r",0\.5,1000000000$",
    ),
    "dangling-movie-id": Case(
        "base", _set("ratings", 60, 1, "999999999"), "ratings", line=60,
        reason=("dangling key: item=999999999 not in", "movies.csv"), value=r"^\d+,999999999,",
    ),
    "duplicate-movie-id": Case(
        "base", _duplicate_movie, "movies", line=9744,
        reason=("duplicate key: (item)=(2) already on line 3",), value=r"^2,Jumanji again",
    ),
    "tag-of-dangling-movie": Case(
        "base", _set("tags", 5, 1, "999999999"), "tags", line=5,
        reason=("dangling key: item=999999999 not in", "movies.csv"), value=r"^\d+,999999999,",
    ),
    "criteo-label-2": Case(
        "criteo", _set("clicks", 13, 0, "2", "\t"), "clicks", line=13,
        reason=("bad label", "label='2'", "is not 0 or 1"), value=r"^2\t",
    ),
    "criteo-missing-label": Case(
        "criteo", _set("clicks", 7, 0, "", "\t"), "clicks", line=7,
        reason=("missing value: label is empty",), value=r"^\t",
    ),
    "criteo-too-few-fields": Case(
        "criteo", _too_few_fields, "clicks", line=20,
        reason=("malformed row", "expected 40 fields, found 30"), value=r"^[^\t]*(\t[^\t]*){29}$",
    ),
    "criteo-too-few-fields-crlf": Case(
        "criteo", _crlf_too_few_fields, "clicks", line=20,
        reason=("malformed row", "expected 40 fields, found 30"), value=r"^[^\t]*(\t[^\t]*){29}$",
    ),
    "avazu-bad-hour": Case(
        "avazu", _set("clicks", 30, 2, "14132100"), "clicks", line=30,
        reason=("unparsable value", "hour='14132100'", "YYMMDDHH"), value=r"^\d+,[01],14132100,",
    ),
    "avazu-bad-click": Case(
        "avazu", _set("clicks", 31, 1, "yes"), "clicks", line=31,
        reason=("bad label", "click='yes'"), value=r"^\d+,yes,\d{8},",
    ),
    "avazu-duplicate-id": Case(
        "avazu", _duplicate_avazu_id, "clicks", line=40,
        reason=("duplicate key: (id)=(", "already on line 5"), value=r"^\d+,[01],",
    ),
    # ---- inputs that must work
    "optional-tags-absent": Case("base", _remove("tags"), "ratings", check=_no_tags),
    "utf8-byte-order-mark": Case("base", _bom, "ratings", check=_bom_read),
}


# ------------------------------------------------------------------ machinery


def _source_lines(spec: str, request: pytest.FixtureRequest, count: int | None) -> list[str | bytes]:
    kind, rel = spec.split(":", 1)
    base = request.getfixturevalue("shipped") if kind == "shipped" else request.getfixturevalue("data_root")
    with (Path(base) / rel).open(encoding="utf-8", newline="") as fh:
        lines: list[str | bytes] = []
        for text in fh:
            if count is not None and len(lines) == count:
                break
            lines.append(text.rstrip("\r\n"))
    return lines


def _prepare(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Files]:
    """Write the mutated files; return their catalog options, the ingestion params and the lines."""
    conf = request.getfixturevalue("conf")
    sources = SOURCES[case.env]
    files = Files({role: _source_lines(src, request, count) for role, (src, count, _) in sources.items()})
    case.mutate(files)
    if case.env == "base":
        # conf/base's options for the shipped files, pointed at the copies.
        configs = {
            role: {**cfg, "filepath": str(tmp_path / Path(cfg["filepath"]).name)}
            for role, cfg in conf.raw_files("base").items()
        }
        assert {role: bool(cfg.get("optional")) for role, cfg in configs.items()} == {
            role: optional for role, (_, _, optional) in sources.items()
        }
    else:
        configs = conf.raw_files(case.env, tmp_path)
    for role, cfg in configs.items():
        if role in files.absent:
            continue
        path = Path(cfg["filepath"])
        path.parent.mkdir(parents=True, exist_ok=True)
        eol = files.eol.get(role, "\n").encode()
        body = eol.join(x if isinstance(x, bytes) else x.encode("utf-8") for x in files.lines[role])
        path.write_bytes(files.prefix.get(role, b"") + body + (eol if files.lines[role] else b""))
    return configs, conf.params(case.env, "ingestion"), files


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=name, marks=[pytest.mark.data_root] if c.env != "base" else []) for name, c in CASES.items()],
)
def test_malformed_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    configs, params, files = _prepare(case, request, tmp_path)
    conf = request.getfixturevalue("conf")
    path = configs[case.role]["filepath"]

    if case.error:
        with pytest.raises(RawInputError) as info:
            ingest(conf.read(configs), params)
        message = str(info.value)
        for part in case.error:
            assert part.replace("{path}", path) in message, message
        return

    clean, quarantine, schema, report = ingest(conf.read(configs), params)
    for file_path, counts in report["files"].items():
        assert counts["rows_read"] == counts["rows_kept"] + counts["rows_quarantined"], file_path
        assert counts["rows_quarantined"] == int((quarantine["file"] == file_path).sum()), file_path
    main = next(p for p, f in report["files"].items() if f["main"])
    assert report["files"][main]["rows_kept"] == len(clean)
    if case.check is not None:
        case.check({"clean": clean, "quarantine": quarantine, "schema": schema, "report": report})
        return

    # Exactly one row was set aside, from the expected file and line, for the expected reason.
    assert quarantine[["file", "line"]].values.tolist() == [[path, case.line]], quarantine
    reason = quarantine["reason"].item()
    for part in case.reason:
        assert part in reason, reason
    # The reported line of the written file really holds the bad value.
    written = Path(path).read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n")
    assert case.value is not None and re.search(case.value, written[case.line - 1]), written[case.line - 1]
    duplicate = re.search(r"duplicate key: \(([^)]*)\)=\(([^)]*)\) already on line (\d+)$", reason)
    if duplicate:
        # The key is on both lines the reason names.
        sep = "\t" if case.env == "criteo" else ","
        key = duplicate.group(2).split(",")
        for n in (case.line, int(duplicate.group(3))):
            assert set(key) <= set(written[n - 1].split(sep)), (n, key, written[n - 1])
    counts = report["files"][path]
    assert counts["rows_quarantined"] == 1
    assert counts["rows_read"] == len(files.lines[case.role]) - (1 if case.env != "criteo" else 0)
    kind = reason.split(":", 1)[0]
    assert counts["quarantined_by_reason"] == {kind: 1}
    if path == main:
        # Every other data line is kept, each traced to its own line of the file.
        first = 1 if case.env == "criteo" else 2
        expected_lines = [n for n in range(first, len(written) + (0 if written[-1] == "" else 1)) if n != case.line]
        assert clean["source_line"].tolist() == expected_lines


def test_too_many_bad_rows_stop_the_run_after_ingest_kept_them(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    bad_lines = [20, 40, 60, 80, 100]  # 5 of 199 rows: 2.51% > max_quarantine_share 1%

    def mutate(f: Files) -> None:
        for line in bad_lines:
            f.set_field("ratings", line, 2, "n/a", ",")

    case = Case("base", mutate, "ratings")
    configs, params, _ = _prepare(case, request, tmp_path)
    assert params["max_quarantine_share"] == 0.01
    conf = request.getfixturevalue("conf")
    clean, quarantine, _, report = ingest(conf.read(configs), params)
    # Nothing is lost: the quarantine holds every bad row, the table every other one.
    path = configs["ratings"]["filepath"]
    assert quarantine["line"].tolist() == bad_lines
    assert (quarantine["file"] == path).all()
    assert all("rating='n/a'" in r for r in quarantine["reason"])
    assert len(clean) + len(quarantine) == HEAD - 1
    assert report["max_quarantined_share"] == pytest.approx(5 / 199)
    with pytest.raises(QuarantineLimitError) as info:
        check_quarantine(clean, report)
    message = str(info.value)
    assert path in message and "5 of 199 rows (2.51%)" in message and "max_quarantine_share=1.00%" in message

    # The same report under a looser limit passes the check.
    relaxed = check_quarantine(clean, {**report, "max_quarantine_share_allowed": 0.05})
    assert relaxed is not None


def test_malformed_row_of_a_multi_character_separator_file_is_shown_as_written(tmp_path):
    from dynamic_ctr.data.raw import RawFileConfig, read_raw

    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::10::5::978300760\n2::20::4\n3::30::3::978300761\n")
    raw = read_raw(RawFileConfig(filepath=str(path), sep="::", header=False, quoted=False, names=("u", "i", "r", "t")))
    assert raw.table.num_rows == 2 and raw.lines.tolist() == [1, 3]
    assert [(m.line, m.text) for m in raw.malformed] == [(2, "2::20::4")]
