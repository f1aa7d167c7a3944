"""Spark nodes: Criteo ingestion, the hash split and encoding on a Spark cluster.

Every row-level decision is made by the project's own functions, called on Arrow
batches inside Spark tasks (``mapInArrow``), so the results are those of the in-memory
pipeline by construction:

- typing and quarantine: :func:`dynamic_ctr.data.adapters.criteo` on each batch of
  lines (only the split of a line into its tab-separated fields happens here);
- the split: :func:`dynamic_ctr.data.split.hash_parts` on each batch's keys;
- the fit: per-field value counts by ``groupBy`` on the cluster, collected to the
  driver and turned into the encoder by
  :meth:`~dynamic_ctr.data.encoder.FeatureEncoder.from_counts` (the code path of
  :meth:`~dynamic_ctr.data.encoder.FeatureEncoder.fit`);
- encoding: :meth:`~dynamic_ctr.data.encoder.FeatureEncoder.transform` on each batch,
  the encoder shipped to the tasks as its JSON dict.

pyspark is imported inside the functions: importing this module (and the pipeline
registry) never needs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dynamic_ctr.data.adapters import CRITEO_COLUMNS, criteo
from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, FieldCounts
from dynamic_ctr.data.raw import MalformedRow, RawInputError, RawTable
from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.data.split import SplitParams, hash_parts
from dynamic_ctr.pipelines.features.nodes import spec_with_roles
from dynamic_ctr.pipelines.ingestion.nodes import file_report, ingestion_report, quarantine_verdict
from dynamic_ctr.spec import OOV_INDEX

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
else:  # pyspark is imported lazily; Kedro's hint reader resolves the name to Any
    DataFrame = Any

#: The adapters whose rows are decided one line at a time (no joins, no duplicate keys).
ROW_LOCAL_ADAPTERS = ("criteo",)
_SEP = "\t"
#: The columns of the one Arrow table each ingestion task returns: clean rows have no
#: ``reason``; quarantined rows have only ``source_line`` (their line), reason and row.
_CLEAN_TYPES: dict[str, pa.DataType] = {
    "label": pa.int8(), **{c: pa.float64() for c in CRITEO_COLUMNS if c.startswith("I")},
    **{c: pa.string() for c in CRITEO_COLUMNS if c.startswith("C")}, "source_line": pa.int64(),
}
_INGESTED = pa.schema([*_CLEAN_TYPES.items(), ("reason", pa.string()), ("row", pa.string())])


def _ddl(schema: pa.Schema) -> str:
    """The Spark DDL of an Arrow schema (the few types these nodes write)."""
    names = {pa.int8(): "tinyint", pa.int16(): "smallint", pa.int32(): "int", pa.int64(): "bigint",
             pa.float64(): "double", pa.string(): "string"}
    return ", ".join(f"`{f.name}` {names[f.type]}" for f in schema)


# --------------------------------------------------------------------------- session

def start_spark(params: dict[str, Any]) -> dict[str, Any]:
    """Create (or join) the Spark session every Spark dataset of the run uses.

    ``params`` (``spark``): ``master`` (``local[1]`` by default), ``app_name`` and
    ``config`` (Spark properties). The ingestion node takes this node's output, so the
    session exists, configured, before the first ``spark.SparkDatasetV2`` loads.
    Python workers run this interpreter unless ``PYSPARK_PYTHON`` says otherwise.

    Returns the session's master, application id and Spark version.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(str(params.get("master", "local[1]"))).appName(
        str(params.get("app_name", "dynamic-ctr")))
    for key, value in (params.get("config") or {}).items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    spark = builder.getOrCreate()
    return {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId, "version": spark.version}


# --------------------------------------------------------------------------- ingestion

def _local_path(uri: str) -> str:
    """``file:/a/b`` -> ``/a/b`` (the path the pandas reader names); other URIs as they are."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def _fields(lines: pa.Array, names: tuple[str, ...]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Lines -> (text columns of the rows with ``len(names)`` fields, those rows' mask,
    field counts). Empty fields are null; an empty line is a row of nulls (as pyarrow's
    reader with ``ignore_empty_lines=False`` reads it, and the adapter quarantines it)."""
    width = len(names)
    text = pc.if_else(pc.equal(lines, ""), _SEP * (width - 1), lines)
    split = pc.split_pattern(text, _SEP)
    found = pc.list_value_length(split).to_numpy(zero_copy_only=False)
    good = found == width
    flat = pc.list_flatten(split.filter(pa.array(good)))
    columns = {}
    for j, name in enumerate(names):
        column = flat.take(pa.array(np.arange(j, len(flat), width)))
        columns[name] = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    return pa.table(columns, schema=pa.schema([(n, pa.string()) for n in names])), good, found


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return values.chunks if isinstance(values, pa.ChunkedArray) else [values]


def _ingest_batches(batches: Iterator[pa.RecordBatch], path: str, first_lines: dict[int, int], options: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    """One Spark task: number the lines of its file blocks, split them into fields and
    type them with the Criteo adapter; yield the clean rows and the quarantined ones."""
    seen: dict[int, int] = {}
    for batch in batches:
        blocks = batch.column("block").to_numpy(zero_copy_only=False)
        lines = np.empty(len(blocks), dtype=np.int64)
        # A task reads each of its blocks from start to end: a line's number is its
        # block's first line plus the lines of the block already read.
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        for start, end in zip(starts, [*starts[1:], len(blocks)]):
            block = int(blocks[start])
            done = seen.get(block, 0)
            lines[start:end] = first_lines[block] + done + np.arange(end - start)
            seen[block] = done + end - start
        text = batch.column("value")
        table, good, found = _fields(text, CRITEO_COLUMNS)
        bad = np.flatnonzero(~good)
        malformed = [MalformedRow(int(lines[i]), f"expected {len(CRITEO_COLUMNS)} fields, found {found[i]}", text[i].as_py()) for i in bad]
        result = criteo({"clicks": RawTable(path, table, lines[good], malformed)}, options)
        clean = pa.Table.from_pandas(result.table, preserve_index=False)
        quarantine = result.quarantine.frame()
        n_clean, n_bad = clean.num_rows, len(quarantine)
        arrays = []
        for field in _INGESTED:
            if field.name == "source_line":
                kept, set_aside = clean.column("source_line"), pa.array(quarantine["line"], pa.int64())
            elif field.name in ("reason", "row"):
                kept, set_aside = pa.nulls(n_clean, pa.string()), pa.array(quarantine[field.name], pa.string())
            else:
                kept, set_aside = clean.column(field.name), pa.nulls(n_bad, field.type)
            chunks = [c.cast(field.type) for part in (kept, set_aside) for c in _chunks(part)]
            arrays.append(pa.chunked_array(chunks, field.type).combine_chunks())
        yield pa.RecordBatch.from_arrays(arrays, schema=_INGESTED)


def ingest_lines(session: dict[str, Any], raw_lines: DataFrame, params: dict[str, Any]) -> tuple[DataFrame, DataFrame, dict[str, Any], dict[str, Any]]:
    """Type and validate the raw Criteo lines on Spark (the ``ingest`` node's Spark twin).

    Args:
        session: :func:`start_spark`'s output (the node waits for the session).
        raw_lines: the raw file as ``spark.SparkDatasetV2`` loads it with
            ``file_format: text`` (one row per line, column ``value``).
        params: ``ingestion``: ``adapter`` (``criteo``), ``options``, ``max_quarantine_share``.

    Returns:
        The clean rows (columns and types of the pandas clean table), the quarantine
        (file, line, reason, row), the table schema and the ingestion report.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if params["adapter"] not in ROW_LOCAL_ADAPTERS:
        raise ValueError(f"ingestion.adapter={params['adapter']!r}: the Spark pipeline runs {list(ROW_LOCAL_ADAPTERS)}")
    options = dict(params.get("options") or {})
    lines = raw_lines.select("value", F.col("_metadata.file_path").alias("file"),
                             F.col("_metadata.file_block_start").alias("block"))
    # First pass: lines per block, so that each task knows the number of its first line.
    blocks = lines.groupBy("file", "block").count().collect()
    files = sorted({b["file"] for b in blocks})
    if len(files) != 1:
        raise RawInputError(f"the Spark ingestion reads one raw file (its lines are the rows' keys); found {len(files) or 'no'} file(s): {files}")
    path = _local_path(files[0])
    first_lines, total = {}, 0
    for b in sorted(blocks, key=lambda b: b["block"]):
        first_lines[int(b["block"])] = total + 1
        total += int(b["count"])
    if total == 0:
        raise RawInputError(f"{path}: file is empty")
    ingested = lines.mapInArrow(partial(_ingest_batches, path=path, first_lines=first_lines, options=options),
                                _ddl(_INGESTED)).persist(StorageLevel.MEMORY_AND_DISK)
    clean = ingested.filter(F.col("reason").isNull()).drop("reason", "row")
    quarantine = ingested.filter(F.col("reason").isNotNull()).select(
        F.lit(path).alias("file"), F.col("source_line").alias("line"), "reason", "row")
    kinds = ingested.groupBy(F.substring_index("reason", ":", 1).alias("kind")).agg(
        F.count(F.lit(1)).alias("rows"), F.avg("label").alias("positive_rate")).collect()
    by_reason = {k["kind"]: int(k["rows"]) for k in kinds if k["kind"] is not None}
    kept = next((k for k in kinds if k["kind"] is None), None)
    rows = int(kept["rows"]) if kept else 0
    files = {path: file_report(total, rows, dict(sorted(by_reason.items())), {}, True)}
    report = ingestion_report(params, files, rows, float(kept["positive_rate"]) if kept else None, {})
    schema = criteo({"clicks": RawTable(path, _fields(pa.array([], pa.string()), CRITEO_COLUMNS)[0], np.zeros(0, np.int64))}, options).schema
    return clean, quarantine, schema.to_dict(), report


def check_ingestion(report: dict[str, Any]) -> dict[str, Any]:
    """The ingestion gate (``check_quarantine``'s verdict) on the report's counts: the
    clean rows stay on the cluster."""
    return quarantine_verdict(report["rows"], report)


# --------------------------------------------------------------------------- split

def _part_batches(batches: Iterator[pa.RecordBatch], key: tuple[str, ...], params: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    split = SplitParams.from_dict(params)
    for batch in batches:
        keys = pa.Table.from_batches([batch]).select(list(key)).to_pandas(types_mapper=pd.ArrowDtype)
        yield batch.append_column("part", pa.array(hash_parts(keys, split), pa.int8()))


def split_rows(clean: DataFrame, table_schema: dict[str, Any], ingestion_check: dict[str, Any], params: dict[str, Any]) -> tuple[DataFrame, DataFrame, DataFrame, dict[str, Any]]:
    """The hash split on Spark (the ``split_interactions`` node's Spark twin): each row's
    part from :func:`~dynamic_ctr.data.split.hash_parts`, batch by batch.

    Returns the train, validation and test rows, each ordered by ``source_line`` (the
    order of the pandas split, so encoded and primary rows line up), and the summary.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import ByteType, StructField, StructType

    if not ingestion_check.get("passed"):
        raise ValueError(f"the clean table did not pass the ingestion check: {ingestion_check}")
    schema = TableSchema.from_dict(table_schema)
    split = SplitParams.from_dict(params)
    if split.method != "hash":
        raise ValueError(f"features.split.method={split.method!r}: Spark splits with 'hash' (each row decided alone)")
    if schema.item_aggregated:
        raise ValueError(f"item_aggregated columns {list(schema.item_aggregated)} need the in-memory features pipeline")
    key = split.key_columns(schema.key_columns)
    out = StructType([*clean.schema.fields, StructField("part", ByteType(), False)])
    parted = clean.mapInArrow(partial(_part_batches, key=key, params=params), out).persist(StorageLevel.MEMORY_AND_DISK)
    stats = {int(r["part"]): (int(r["rows"]), float(r["positive_rate"]))
             for r in parted.groupBy("part").agg(F.count(F.lit(1)).alias("rows"), F.avg("label").alias("positive_rate")).collect()}
    names = ("train", "valid", "test")
    rows = {name: stats.get(i, (0, 0.0))[0] for i, name in enumerate(names)}
    if min(rows.values()) == 0:
        raise ValueError(f"features.split.ratios={list(split.ratios)} leave an empty part for {sum(rows.values())} rows")
    parts = [parted.filter(F.col("part") == i).drop("part").orderBy("source_line") for i in range(3)]
    summary = {"method": split.method, "seed": split.seed, "rows": rows,
               "positive_rate": {name: stats[i][1] for i, name in enumerate(names)}}
    return parts[0], parts[1], parts[2], summary


# --------------------------------------------------------------------------- encoder

def count_fields_spark(train: DataFrame, schema: TableSchema, params: EncoderParams) -> dict[str, FieldCounts]:
    """:func:`dynamic_ctr.data.encoder.count_fields` on Spark: per field, each value and
    how often it is seen (null included; numeric fields as raw float values), one
    ``groupBy`` per kind of field, collected to the driver.

    A categorical value seen fewer than its field's ``min_count`` times maps to OOV
    whatever else is seen, so it is dropped on the cluster and never reaches the
    driver. Numeric values are all kept: they are bucketed on the driver, and rare
    values may add up in one bucket.
    """
    from pyspark.sql import functions as F

    if schema.multi_valued:
        raise ValueError(f"multi-valued fields {list(schema.multi_valued)} are not encoded on Spark")
    counts: dict[str, FieldCounts] = {}
    kinds = ((schema.categorical, "string", pa.string(), True), (schema.numeric, "double", pa.float64(), False))
    for names, spark_type, arrow_type, drop_rare in kinds:
        if not names:
            continue
        pairs = train.select(F.explode(F.array(*(
            F.struct(F.lit(n).alias("field"), F.col(n).cast(spark_type).alias("value")) for n in names))).alias("fv"))
        grouped = pairs.groupBy("fv.field", "fv.value").agg(F.count(F.lit(1)).alias("n"))
        if drop_rare:
            least = F.create_map(*(x for n in names for x in (F.lit(n), F.lit(params.min_count_per_field.get(n, params.min_count)))))
            grouped = grouped.filter(F.col("n") >= least[F.col("field")])
        table = grouped.toArrow()
        field = table.column("field").to_numpy(zero_copy_only=False)
        for name in names:
            mine = pa.array(field == name)
            counts[name] = FieldCounts(table.column("value").filter(mine).combine_chunks().cast(arrow_type),
                                         table.column("n").filter(mine).to_numpy().astype(np.int64))
    return counts


def fit_encoder_spark(train: DataFrame, table_schema: dict[str, Any], params: dict[str, Any], roles: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder fitted on the Spark training rows: counts on the cluster, then
    :meth:`FeatureEncoder.from_counts` on the driver. Returns its JSON and the feature spec."""
    schema = TableSchema.from_dict(table_schema)
    encoder_params = EncoderParams(**params)
    encoder = FeatureEncoder.from_counts(count_fields_spark(train, schema, encoder_params), schema, encoder_params)
    return encoder.to_dict(), spec_with_roles(encoder.feature_spec().to_dict(), roles)


# --------------------------------------------------------------------------- encoding

def _encoded_schema(encoder: FeatureEncoder) -> pa.Schema:
    return pa.schema([("label", pa.int8()), *((f.name, pa.int32()) for f in encoder.fields), ("source_line", pa.int64())])


def _encode_batches(batches: Iterator[pa.RecordBatch], encoder: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    fitted = FeatureEncoder.from_dict(encoder)  # once per task
    schema = _encoded_schema(fitted)
    for batch in batches:
        frame = pa.Table.from_batches([batch]).to_pandas(types_mapper=pd.ArrowDtype)
        encoded, _ = fitted.transform(frame, passthrough=("source_line",))
        yield pa.RecordBatch.from_pandas(encoded, schema=schema, preserve_index=False)


def encode_splits_spark(encoder: dict[str, Any], train: DataFrame, valid: DataFrame, test: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame, dict[str, Any]]:
    """Encode the three splits on Spark with :meth:`FeatureEncoder.transform`; the
    columns are those of ``encode_splits`` (``label`` int8, one int32 per field,
    ``source_line``), rows ordered by ``source_line``. The report counts rows and, per
    field, rows holding an unseen value, as ``encode_splits`` does."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    fitted = FeatureEncoder.from_dict(encoder)
    if any(f.kind == "multi_valued" for f in fitted.fields):
        raise ValueError("multi-valued fields are not encoded on Spark")
    ddl = _ddl(_encoded_schema(fitted))
    report: dict[str, Any] = {}
    out = []
    for name, frame in (("train", train), ("valid", valid), ("test", test)):
        encoded = frame.mapInArrow(partial(_encode_batches, encoder=encoder), ddl).persist(StorageLevel.MEMORY_AND_DISK)
        row = encoded.agg(F.count(F.lit(1)).alias("rows"), *(
            F.sum((F.col(f.name) == OOV_INDEX).cast("long")).alias(f.name) for f in fitted.fields)).first()
        report[name] = {"rows": int(row["rows"]),
                        "fields": {f.name: {"oov_rows": int(row[f.name] or 0), "truncated_rows": 0} for f in fitted.fields}}
        out.append(encoded.orderBy("source_line"))
    return out[0], out[1], out[2], report
