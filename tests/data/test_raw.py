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
