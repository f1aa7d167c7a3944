"""Compressed raw files (gzip, bzip2, zstd) are read as their decompressed text."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from dynamic_ctr.data.adapters import ADAPTERS
from dynamic_ctr.data.raw import RawFileConfig, RawInputError, compression_of, read_raw


def _compress(data: bytes, codec: str, path: Path) -> Path:
    if codec == "gzip":
        path.write_bytes(gzip.compress(data))
    elif codec == "bz2":
        path.write_bytes(bz2.compress(data))
    else:
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(data)
    return path


@pytest.mark.parametrize("codec", ["gzip", "bz2", "zstd"])
def test_a_compressed_file_reads_like_the_plain_one(shipped: Path, tmp_path: Path, codec: str) -> None:
    plain = shipped.parent / "ml-latest-tiny" / "ratings.csv"
    packed = _compress(plain.read_bytes(), codec, tmp_path / "ratings.csv.data")  # the name does not matter
    assert compression_of(packed) == codec and compression_of(plain) is None
    a, b = read_raw(RawFileConfig(filepath=str(plain))), read_raw(RawFileConfig(filepath=str(packed)))
    assert a.table.equals(b.table) and (a.lines == b.lines).all()


def test_malformed_rows_of_a_compressed_file_keep_their_lines(tmp_path: Path) -> None:
    text = b"a,b\n1,2\n3\n4,5\n"
    raw = read_raw(RawFileConfig(filepath=str(_compress(text, "gzip", tmp_path / "t.csv.gz"))))
    assert raw.table.num_rows == 2 and [m.line for m in raw.malformed] == [3]


def test_a_broken_or_empty_compressed_file_is_refused_by_name(tmp_path: Path) -> None:
    broken = tmp_path / "cut.csv.gz"
    broken.write_bytes(gzip.compress(b"a,b\n" + b"1,2\n" * 1000)[:40])
    with pytest.raises(RawInputError, match=r"cut.csv.gz: looks gzip-compressed but cannot be decompressed"):
        read_raw(RawFileConfig(filepath=str(broken)))
    with pytest.raises(RawInputError, match=r"empty.csv.gz: file is empty \(once gzip-decompressed\)"):
        read_raw(RawFileConfig(filepath=str(_compress(b"", "gzip", tmp_path / "empty.csv.gz"))))


def test_the_criteo_download_gzipped_goes_through_its_adapter(conf, data_root: Path, tmp_path: Path) -> None:
    """As a new user would: the Criteo sample gzipped, with the criteo environment's own
    file options and adapter (before, this failed with "line 1 has 1 field where 40 were
    expected ... wrong separator?")."""
    options = conf.raw_files("criteo", data_root)["clicks"]
    packed = _compress(Path(options["filepath"]).read_bytes(), "gzip", tmp_path / "train.txt.gz")
    plain = read_raw(RawFileConfig.from_dict(options))
    zipped = read_raw(RawFileConfig.from_dict({**options, "filepath": str(packed)}))
    assert plain.table.equals(zipped.table) and (plain.lines == zipped.lines).all()
    a, b = ADAPTERS["criteo"]({"clicks": plain}, {}), ADAPTERS["criteo"]({"clicks": zipped}, {})
    assert a.table.equals(b.table) and len(b.table) > 9000


# ------------------------------------------------------------------ streaming in batches


def _batched(cfg: RawFileConfig, batch_bytes: int) -> tuple[pa.Table, list[int], list[tuple[int, str, str]], int]:
    from dynamic_ctr.data.raw import iter_raw_batches

    batches = list(iter_raw_batches(cfg, batch_bytes))
    table = pa.concat_tables([b.table for b in batches])
    lines = [int(x) for b in batches for x in b.lines]
    malformed = [(m.line, m.reason, m.text) for b in batches for m in b.malformed]
    return table, lines, malformed, len(batches)


def _same_as_read_raw(cfg: RawFileConfig, batch_bytes: int, check_lines: bool = True) -> int:
    whole = read_raw(cfg)
    table, lines, malformed, n = _batched(cfg, batch_bytes)
    assert table.equals(whole.table)
    if check_lines:
        assert lines == whole.lines.tolist()
    assert malformed == [(m.line, m.reason, m.text) for m in whole.malformed]
    return n


@pytest.mark.parametrize("batch_bytes", [64, 997, 1 << 20])
def test_batches_put_together_equal_the_whole_file(shipped: Path, batch_bytes: int) -> None:
    """The shipped ratings (quoted CSV with a header), read a few bytes at a time: the
    same rows, the same line numbers, whatever the batch size."""
    n = _same_as_read_raw(RawFileConfig(filepath=str(shipped.parent / "ml-latest-tiny" / "ratings.csv")), batch_bytes)
    assert n > 1 or batch_bytes == 1 << 20


@pytest.mark.parametrize("codec", [None, "gzip", "zstd"])
def test_batches_keep_malformed_rows_quoted_newlines_and_lines(tmp_path: Path, codec: str | None) -> None:
    """Malformed rows keep their file line in any batch; a quoted field holding a line
    break is never cut between batches; a compressed file streams the same."""
    text = b'id,title,score\n1,"plain",3\n2,"two\nlines",4\n3,broken\n4,"a, b",5\n\n5,x,6,7\n' + b"".join(
        f'{i},"t{i}",{i % 5}\n'.encode() for i in range(6, 200)
    ) + b"200,last,1"  # no final line break
    path = tmp_path / "t.csv"
    if codec:
        _compress(text, codec, path)
    else:
        path.write_bytes(text)
    cfg = RawFileConfig(filepath=str(path))
    for batch_bytes in (8, 50, 333, 1 << 16):
        # Good rows' lines: read_raw counts records, the stream counts the lines an
        # editor shows; they part after a quoted line break, so only the rows and the
        # malformed rows' lines are compared here.
        _same_as_read_raw(cfg, batch_bytes, check_lines=False)
    _, lines, malformed, _ = _batched(cfg, 8)
    assert [m[0] for m in malformed] == [5, 8]  # "3,broken" and "5,x,6,7" (the blank line is a row of nulls, as in read_raw)
    assert lines[:5] == [2, 3, 6, 7, 9] and lines[-1] == 203  # physical lines: row 2 spans lines 3-4


def test_batches_of_a_multi_character_separator_and_latin1(tmp_path: Path) -> None:
    """MovieLens-1M's layout: ``::``-separated, Latin-1, no header."""
    path = tmp_path / "movies.dat"
    path.write_bytes("".join(f"{i}::Caf\u00e9 {i} (1995)::Drama|Com\u00e9die\n" for i in range(1, 300)).encode("latin-1") + b"300::bad\n")
    cfg = RawFileConfig(filepath=str(path), sep="::", header=False, names=("movie", "title", "genres"), encoding="latin-1", quoted=False)
    assert _same_as_read_raw(cfg, 100) > 50


def test_streaming_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    from dynamic_ctr.data.raw import iter_raw_batches

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"a,b\n" + b"1,2\n" * 500 + b"3,\xff\xfe\n")
    with pytest.raises(RawInputError, match=r"bad.csv: line 502: bytes .* are not valid UTF-8"):
        list(iter_raw_batches(RawFileConfig(filepath=str(bad)), 64))
    wrong = tmp_path / "wrong.tsv"
    wrong.write_bytes(b"a\tb\n" + b"1\t2\n" * 100)
    with pytest.raises(RawInputError, match=r"wrong.tsv: line 1 has 1 field where several were expected"):
        next(iter_raw_batches(RawFileConfig(filepath=str(wrong)), 64))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(RawInputError, match=r"empty.csv: file is empty"):
        list(iter_raw_batches(RawFileConfig(filepath=str(empty))))
    header_only = tmp_path / "header.csv"
    header_only.write_bytes(b"a,b\n")
    with pytest.raises(RawInputError, match=r"header.csv: file has a header but no rows"):
        list(iter_raw_batches(RawFileConfig(filepath=str(header_only))))


def test_the_criteo_sample_streams_in_batches_like_read_raw(conf, data_root: Path) -> None:
    options = conf.raw_files("criteo", data_root)["clicks"]
    assert _same_as_read_raw(RawFileConfig.from_dict(options), 200_000) > 5
