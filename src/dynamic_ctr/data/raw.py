"""Reading raw click-log files into all-string tables, with errors that name the file.

Every raw file is read with every column as (nullable) text: typing, validation and
quarantine happen afterwards in :mod:`dynamic_ctr.data.validation`, where a bad value
can be traced to its file and row. Rows with the wrong number of fields are not
dropped: they are kept in ``RawTable.malformed`` and end up in the quarantine.

Row numbers are 1-based data-record numbers; ``line`` adds the header line, so for
files without quoted newlines it is the line an editor shows.

Compressed delimited files (gzip, bzip2, zstd: Criteo's and Avazu's own downloads) are
recognised by their first bytes, whatever their name, and decompressed in memory before
they are parsed, so lines and messages refer to the decompressed text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

#: Separators tried when a header does not split into the expected columns.
_COMMON_SEPARATORS = (",", "\t", ";", "|", " ", "::")
#: Multi-character separators (MovieLens-1M's ``::``) are rewritten to this byte first.
_UNIT_SEPARATOR = "\x1f"
#: The first bytes of each compressed format read directly (pyarrow's codec names).
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}


def compression_of(path: Path) -> str | None:
    """The compression of ``path`` by its magic bytes (``gzip``, ``bz2``, ``zstd``), or None."""
    with path.open("rb") as f:
        start = f.read(4)
    return next((codec for magic, codec in _MAGIC.items() if start.startswith(magic)), None)


def _decompress(path: Path, codec: str) -> bytes:
    try:
        with pa.input_stream(str(path), compression=codec) as stream:
            return stream.read()
    except (OSError, pa.ArrowInvalid) as exc:
        raise RawInputError(f"{path}: looks {codec}-compressed but cannot be decompressed: {exc}") from exc


class RawInputError(ValueError):
    """A raw file cannot be read as configured; the message names the file."""


@dataclass
class MalformedRow:
    line: int
    reason: str
    text: str


@dataclass
class RawTable:
    """One raw file as text columns.

    Attributes:
        path: the file it came from (for messages and the ingestion report).
        table: every column as ``pa.string()`` (nulls where the file had empty fields
            or a configured missing marker); parquet inputs keep their own types.
        lines: ``(N,)`` int64, the line of each row of ``table`` in the file.
        malformed: rows that did not have the expected number of fields.
    """

    path: str
    table: pa.Table
    lines: np.ndarray
    malformed: list[MalformedRow] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return self.table.num_rows + len(self.malformed)


@dataclass(frozen=True)
class RawFileConfig:
    """How to read one raw file (a ``files:`` entry of :class:`RawSourceDataset`).

    Args:
        filepath: the file.
        format: ``delimited`` (CSV, TSV, ``::``-separated ...) or ``parquet``.
        sep: field separator; any length (multi-character ones are rewritten).
        header: whether the first line names the columns.
        names: column names for files without a header (or to override it).
        typed_header: header cells look like ``name:type`` (RecBole's layout); the
            ``:type`` suffix is dropped.
        encoding: text encoding of the file; anything but UTF-8 is transcoded.
        missing_values: field values that mean "missing" besides the empty field.
        quoted: whether ``"`` quotes fields (CSV); off for TSV-like formats.
        optional: a missing file yields ``None`` instead of an error.
    """

    filepath: str
    format: str = "delimited"
    sep: str = ","
    header: bool = True
    names: tuple[str, ...] | None = None
    typed_header: bool = False
    encoding: str = "utf-8"
    missing_values: tuple[str, ...] = ()
    quoted: bool = True
    optional: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RawFileConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown raw file option(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(d)
        for key in ("names", "missing_values"):
            if values.get(key) is not None:
                values[key] = tuple(str(v) for v in values[key])
        return cls(**values)


def read_raw(cfg: RawFileConfig) -> RawTable | None:
    """Read one file as configured; see :class:`RawFileConfig`."""
    path = Path(cfg.filepath)
    if not path.is_file():
        if cfg.optional:
            return None
        raise RawInputError(f"{path}: file not found")
    if cfg.format == "parquet":
        return _read_parquet(path)
    if cfg.format != "delimited":
        raise RawInputError(f"{path}: unknown format {cfg.format!r} (use 'delimited' or 'parquet')")
    return _read_delimited(path, cfg)


def _read_parquet(path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RawInputError(f"{path}: not a readable Parquet file: {exc}") from exc
    if table.num_rows == 0:
        raise RawInputError(f"{path}: file has no rows")
    return RawTable(str(path), table, np.arange(1, table.num_rows + 1, dtype=np.int64))


def _read_delimited(path: Path, cfg: RawFileConfig) -> RawTable:
    codec = compression_of(path)
    raw = _decompress(path, codec) if codec else None
    if raw is not None:
        head = raw[: 1 << 16]
        if not raw.strip():
            raise RawInputError(f"{path}: file is empty (once {codec}-decompressed)")
    else:
        with path.open("rb") as f:
            head = f.read(1 << 16)
        if not head.strip() and path.stat().st_size <= len(head):
            raise RawInputError(f"{path}: file is empty")
    # UTF-8 with a one-character separator is read by pyarrow straight from the file;
    # anything else (and a compressed file) is decompressed / transcoded / rewritten in
    # memory first.
    data: bytes | None = None
    if not _is_utf8(cfg) or len(cfg.sep) != 1 or raw is not None:
        data = _prepare(raw if raw is not None else path.read_bytes(), path, cfg)
        head = data[: 1 << 16]
    names, sep = _layout(path, cfg, head)
    source = pa.BufferReader(data) if data is not None else str(path)
    try:
        table, malformed = _parse(source, path, cfg, names, sep, skip_rows=1 if cfg.header else 0)
    except pa.ArrowInvalid as exc:
        if data is None and "utf8" in str(exc).lower().replace("-", ""):
            _to_utf8(path.read_bytes(), path, cfg.encoding)  # raises, naming the line
        raise RawInputError(f"{path}: cannot parse as {cfg.sep!r}-separated text: {exc}") from exc
    header_lines = 1 if cfg.header else 0
    if malformed:
        malformed = _locate_malformed(data if data is not None else path.read_bytes(), malformed, len(names), sep, cfg.sep)
    _check_rows(path, cfg, table.num_rows, malformed, len(names))
    lines = _good_row_lines(table.num_rows, header_lines, [m.line for m in malformed])
    return RawTable(str(path), table, lines, malformed)


def iter_raw_batches(cfg: RawFileConfig, batch_bytes: int = 64 << 20) -> Iterator[RawTable]:
    """Read a delimited file as consecutive :class:`RawTable` batches of about
    ``batch_bytes`` of text each, holding one batch in memory at a time.

    Batches end at line ends (for quoted CSV, at a line end outside quotes), so every
    batch parses alone. Each is read with the same options, messages, malformed-row
    handling and line numbers as :func:`read_raw` would give its rows: the batches put
    together equal ``read_raw(cfg)`` (tested). Compressed files are decompressed as a
    stream. Parquet files are read by row group.
    """
    path = Path(cfg.filepath)
    if not path.is_file():
        if cfg.optional:
            return
        raise RawInputError(f"{path}: file not found")
    if cfg.format == "parquet":
        yield from _parquet_batches(path)
        return
    if cfg.format != "delimited":
        raise RawInputError(f"{path}: unknown format {cfg.format!r} (use 'delimited' or 'parquet')")
    codec = compression_of(path)
    try:
        stream = pa.input_stream(str(path), compression=codec) if codec else path.open("rb")
    except (OSError, pa.ArrowInvalid) as exc:
        raise RawInputError(f"{path}: looks {codec}-compressed but cannot be opened: {exc}") from exc
    with stream:
        names: list[str] | None = None
        sep = cfg.sep
        line_offset = 0  # lines of the file before the current batch
        good = bad = 0
        for chunk in _line_chunks(stream, path, codec, batch_bytes, cfg.quoted):
            data = _prepare(chunk, path, cfg, line_offset)
            if names is None:
                if not data.strip():
                    raise RawInputError(f"{path}: file is empty" + (f" (once {codec}-decompressed)" if codec else ""))
                names, sep = _layout(path, cfg, data[: 1 << 16])
                if cfg.header:  # the header line is not a row
                    cut = data.find(b"\n")
                    data = data[cut + 1 :] if cut >= 0 else b""
                    line_offset = 1
            table, malformed_rows = _parse_bytes(data, path, cfg, names, sep)
            malformed = _locate_malformed(data, malformed_rows, len(names), sep, cfg.sep) if malformed_rows else []
            for row in malformed:
                row.line += line_offset if row.line > 0 else 0
            first_batch = good + bad == 0
            good, bad = good + table.num_rows, bad + len(malformed)
            if first_batch and bad > good:  # a wrong separator shows in the first batch
                _check_rows(path, cfg, table.num_rows, malformed, len(names))
            lines = _good_row_lines(table.num_rows, line_offset, [m.line for m in malformed])
            line_offset += data.count(b"\n")
            yield RawTable(str(path), table, lines, malformed)
        if names is None:
            raise RawInputError(f"{path}: file is empty" + (f" (once {codec}-decompressed)" if codec else ""))
        if good == 0 and bad == 0:
            raise RawInputError(f"{path}: file has a header but no rows")


def _line_chunks(stream: Any, path: Path, codec: str | None, size: int, quoted: bool) -> Iterator[bytes]:
    """Consecutive pieces of ``stream`` of about ``size`` bytes, each ending at a line end
    (outside quotes when ``quoted``: an even number of ``"`` before it)."""
    rest = b""
    while True:
        try:
            block = stream.read(size)
        except (OSError, pa.ArrowInvalid) as exc:
            raise RawInputError(f"{path}: cannot be {codec}-decompressed: {exc}") from exc
        if not block:
            if rest:
                yield rest
            return
        buf = rest + block
        cut = buf.rfind(b"\n")
        while cut >= 0 and quoted and buf.count(b'"', 0, cut) % 2:
            cut = buf.rfind(b"\n", 0, cut)
        if cut < 0:
            rest = buf
            continue
        yield buf[: cut + 1]
        rest = buf[cut + 1 :]


def _parquet_batches(path: Path) -> Iterator[RawTable]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RawInputError(f"{path}: not a readable Parquet file: {exc}") from exc
    if parquet.metadata.num_rows == 0:
        raise RawInputError(f"{path}: file has no rows")
    start = 1
    for i in range(parquet.num_row_groups):
        table = parquet.read_row_group(i)
        yield RawTable(str(path), table, np.arange(start, start + table.num_rows, dtype=np.int64))
        start += table.num_rows


def _is_utf8(cfg: RawFileConfig) -> bool:
    return cfg.encoding.lower().replace("-", "") in ("utf8", "ascii")


def _prepare(data: bytes, path: Path, cfg: RawFileConfig, line_offset: int = 0) -> bytes:
    """Bytes as pyarrow parses them: UTF-8, multi-character separators rewritten.
    ``line_offset``: lines of the file before ``data`` (for messages)."""
    data = _to_utf8(data, path, cfg.encoding, line_offset)
    if len(cfg.sep) != 1:
        data = data.replace(cfg.sep.encode(), _UNIT_SEPARATOR.encode())
    return data


def _layout(path: Path, cfg: RawFileConfig, head: bytes) -> tuple[list[str], str]:
    """The column names and the separator pyarrow splits on, from the file's first bytes."""
    sep = cfg.sep if len(cfg.sep) == 1 else _UNIT_SEPARATOR
    if _is_utf8(cfg) and head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]  # a UTF-8 byte-order mark (spreadsheet exports) is not part of the header
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    if cfg.header:
        names = first_line.split(sep)
        if cfg.typed_header:
            names = [n.split(":", 1)[0] for n in names]
        if cfg.quoted:
            names = [n.strip('"') for n in names]
        if cfg.names is not None:
            names = list(cfg.names)
    elif cfg.names is not None:
        names = list(cfg.names)
    else:
        raise RawInputError(f"{path}: a file without a header needs 'names'")
    if len(set(names)) != len(names):
        raise RawInputError(f"{path}: duplicate column names in header: {names}")
    # A header read from the file "expects" however many fields it splits into.
    _check_separator(path, first_line, sep, cfg.sep, expected=len(cfg.names) if cfg.names else None)
    return names, sep


def _parse(source: Any, path: Path, cfg: RawFileConfig, names: list[str], sep: str, skip_rows: int) -> tuple[pa.Table, list[tuple[str, int]]]:
    """Parse with every column as text; rows with the wrong field count are collected."""
    malformed_rows: list[tuple[str, int]] = []

    def on_invalid_row(row: Any) -> str:
        malformed_rows.append((row.text, row.actual_columns))
        return "skip"

    table = pacsv.read_csv(
        source,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(
            delimiter=sep,
            quote_char='"' if cfg.quoted else False,
            ignore_empty_lines=False,
            invalid_row_handler=on_invalid_row,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            null_values=["", *cfg.missing_values],
            quoted_strings_can_be_null=False,
        ),
    )
    return table, malformed_rows


def _parse_bytes(data: bytes, path: Path, cfg: RawFileConfig, names: list[str], sep: str) -> tuple[pa.Table, list[tuple[str, int]]]:
    if not data:
        return pa.table({n: pa.array([], pa.string()) for n in names}), []
    try:
        return _parse(pa.BufferReader(data), path, cfg, names, sep, skip_rows=0)
    except pa.ArrowInvalid as exc:
        raise RawInputError(f"{path}: cannot parse as {cfg.sep!r}-separated text: {exc}") from exc


def _check_rows(path: Path, cfg: RawFileConfig, n_good: int, malformed: list[MalformedRow], n_names: int) -> None:
    if n_good == 0 and not malformed:
        raise RawInputError(f"{path}: file has a header but no rows")
    if malformed and len(malformed) > n_good:
        example = malformed[0]
        raise RawInputError(
            f"{path}: {len(malformed)} of {len(malformed) + n_good} rows do not have "
            f"{n_names} {cfg.sep!r}-separated fields (line {example.line}: {example.reason}); "
            "wrong separator or wrong column list?"
        )


def _to_utf8(data: bytes, path: Path, encoding: str, line_offset: int = 0) -> bytes:
    if encoding.lower().replace("-", "") in ("utf8", "ascii"):
        # A UTF-8 byte-order mark (as spreadsheet exports write) is not part of the header.
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = line_offset + data.count(b"\n", 0, exc.start) + 1
            bad = data[exc.start : exc.start + 4]
            raise RawInputError(
                f"{path}: line {line}: bytes {bad!r} are not valid UTF-8 "
                "(set the file's 'encoding', e.g. latin-1, if it is not UTF-8)"
            ) from exc
        return data
    try:
        return data.decode(encoding).encode("utf-8")
    except (UnicodeDecodeError, LookupError) as exc:
        raise RawInputError(f"{path}: cannot decode as {encoding}: {exc}") from exc


def _check_separator(path: Path, first_line: str, sep: str, shown_sep: str, expected: int | None) -> None:
    """Fail early, with a hint, when the first line does not split as configured.

    ``expected`` is the configured column count, or ``None`` when the columns come
    from the header itself: then a header that stays one field although it splits on
    another common separator is the tell.
    """
    if len(first_line.split(sep)) > 1 or expected == 1:
        return
    splits = {s: len(first_line.split(s)) for s in _COMMON_SEPARATORS if s != shown_sep}
    likely = [s for s, n in splits.items() if (n == expected if expected else n > 1)]
    if expected is None and not likely:
        return  # a genuine one-column file
    shown = f"{expected}" if expected else "several"
    hint = f"; it splits into {splits[likely[0]]} fields on {likely[0]!r}" if likely else ""
    raise RawInputError(
        f"{path}: line 1 has 1 field where {shown} were expected with separator "
        f"{shown_sep!r}{hint}: wrong separator?"
    )


def _locate_malformed(
    data: bytes, bad_rows: list[tuple[str, int]], expected: int, sep: str, shown_sep: str
) -> list[MalformedRow]:
    """Find the line of each malformed row (pyarrow reports the text, not the line)."""
    rows: list[MalformedRow] = []
    used: dict[bytes, int] = {}
    # pyarrow's row text has no line ending: search CRLF files as LF (same line count).
    data = data.replace(b"\r\n", b"\n")
    padded = b"\n" + data + b"\n"
    for text, found in bad_rows:
        needle = b"\n" + text.encode() + b"\n"
        start = used.get(needle, 0)
        pos = padded.find(needle, start)
        if pos < 0:
            line = -1
        else:
            used[needle] = pos + 1
            line = data.count(b"\n", 0, pos) + 1
        reason = f"expected {expected} fields, found {found}" if text else "empty line"
        rows.append(MalformedRow(line=line, reason=reason, text=text))
    rows.sort(key=lambda r: r.line)
    if sep != shown_sep:  # show the row as it is in the file
        for row in rows:
            row.text = row.text.replace(sep, shown_sep)
    return rows


def _good_row_lines(n_good: int, header_lines: int, malformed_lines: list[int]) -> np.ndarray:
    """Lines of the rows pyarrow kept, given the lines of those it skipped."""
    lines = np.arange(1, n_good + 1, dtype=np.int64) + header_lines
    for bad in sorted(line for line in malformed_lines if line > 0):
        lines[lines >= bad] += 1
    return lines
