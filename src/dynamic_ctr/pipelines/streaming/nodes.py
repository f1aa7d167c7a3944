"""Streaming data nodes: a click log larger than memory -> the same model inputs.

The in-memory pipelines (``ingestion``, ``features``, ``domains``) hold the whole log.
These nodes hold one batch at a time, in two passes over the log:

1. :func:`ingest_stream` reads the raw file in batches, types and checks each with the
   data set's adapter (same messages, same quarantine), splits each row by a seeded
   hash of its key (``features.split.method: hash``) and writes the clean rows of each
   split as Parquet parts, and the hashes of each row's unique key (if the adapter has
   one); :func:`find_duplicates` then finds the keys that an earlier batch already had
   (a batch's own duplicates are the adapter's), sorting the hashes in buckets of
   bounded size, and :func:`quarantine_duplicates_stream` sets those rows aside as the
   adapter would have;
2. :func:`fit_stream` counts the training parts' values (vocabularies, buckets,
   domains, activity) and fits the encoders from the counts; :func:`encode_stream`
   then encodes every part and adds its domains; both leave the duplicates out.

Given the same split, the outputs equal the in-memory pipelines' (tested): the encoders
are fitted from the same counts, and every row is encoded by the same code. Each
generator node yields one :class:`~dynamic_ctr.io.parquet_parts.Part` per batch and
output, then :data:`~dynamic_ctr.io.parquet_parts.END`, which publishes the version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from dynamic_ctr.data.adapters import get_adapter, stream_role
from dynamic_ctr.data.domains import (
    DomainEncoder,
    DomainParams,
    domain_keys,
    domain_table_from_counts,
    frequency_groups_from_counts,
)
from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, count_fields, merge_counts
from dynamic_ctr.data.schema import TableSchema
from dynamic_ctr.data.split import SplitParams, hash_parts
from dynamic_ctr.data.validation import Quarantine, duplicate_records
from dynamic_ctr.io.parquet_parts import END, ParquetParts, Part
from dynamic_ctr.io.raw_source import RawStream
from dynamic_ctr.pipelines.domains.nodes import (
    DOMAIN_FIELD,
    model_feature_spec,
    no_frequency_groups,
    with_domain_columns,
    with_key_index,
)
from dynamic_ctr.pipelines.features.nodes import spec_with_roles
from dynamic_ctr.pipelines.ingestion.nodes import file_report, ingestion_report, quarantine_verdict

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def _split_params(params: dict[str, Any]) -> SplitParams:
    split = SplitParams.from_dict(params)
    if split.method != "hash":
        raise ValueError(
            f"features.split.method={split.method!r}: the streaming pipeline splits each row alone, by a hash of its key; "
            "set features.split.method: hash (a random or time split needs the whole table)"
        )
    return split


def ingest_stream(
    raw_stream: RawStream,
    ingestion: dict[str, Any],
    split_params: dict[str, Any],
    encoder_params: dict[str, Any] | None = None,
    domain_params: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Read, check and split the raw log batch by batch.

    The parameters of the later nodes (encoder, domains) are checked first, and the
    domain columns against the first batch, so a configuration that cannot work stops
    the run before the log is read.

    Yields, per batch, Parts of: the clean train, validation and test rows, the
    quarantined rows (file, line, reason, row), a one-row batch record (rows read,
    kept, quarantined by reason, positives, schema, unique key) and the rows' key
    hashes (:func:`key_hashes`); then END for each.
    """
    role = stream_role(ingestion["adapter"])
    adapter = get_adapter(ingestion["adapter"])
    options = dict(ingestion.get("options") or {})
    split = _split_params(split_params)
    EncoderParams(**(encoder_params or {}))
    domains = DomainParams.from_dict(domain_params) if domain_params is not None else None
    for index, raw in enumerate(raw_stream.batches(role)):
        result = adapter({role: raw}, options)
        if index == 0 and domains is not None:
            domain_keys(result.table.head(0), domains.features)  # raises naming a missing column
            if domains.frequency_key is not None and domains.frequency_key not in result.table.columns:
                raise ValueError(f"domains.frequency_key={domains.frequency_key!r} is not a column of the table ({list(result.table.columns)})")
        keys = result.table[list(split.key_columns(result.schema.key_columns))]
        part = hash_parts(keys, split)
        parts = [result.table[part == i].reset_index(drop=True) for i in range(3)]
        record = {
            "batch": index,
            "path": raw.path,
            "rows_read": raw.rows_read,
            "rows_kept": len(result.table),
            "quarantined_by_reason": json.dumps(result.quarantine.counts(raw.path)),
            "values_set_missing": json.dumps(result.quarantine.set_missing.get(raw.path, {})),
            **{f"rows_{s}": len(p) for s, p in zip(SPLITS, parts)},
            **{f"positives_{s}": int(p["label"].astype("int64").sum()) for s, p in zip(SPLITS, parts)},
            "schema": json.dumps(result.schema.to_dict()),
            "unique_key": json.dumps(list(result.unique_key)),
            "notes": json.dumps(result.notes),
        }
        logger.info("batch %d of %s: %d rows read, %d kept", index, raw.path, raw.rows_read, len(result.table))
        yield (*(Part(p) for p in parts), Part(result.quarantine.frame()), Part(pd.DataFrame([record])),
               Part(key_hashes(result.table, result.unique_key, part)))
    yield (END,) * 6


#: Two independent 64-bit hashes of a row's unique key: two rows are duplicates when both
#: agree (a false match needs a 128-bit collision).
_HASH_KEYS = ("dynamic-ctr-key1", "dynamic-ctr-key2")
KEY_COLUMNS = {"h1": "uint64", "h2": "uint64", "source_line": "int64", "split": "int8", "label": "int8"}


def key_hashes(table: pd.DataFrame, unique_key: tuple[str, ...], split: np.ndarray) -> pd.DataFrame:
    """Per kept row: its unique key's two hashes, line, split (0/1/2) and label; no rows
    when the adapter has no unique key."""
    if not unique_key:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in KEY_COLUMNS.items()})
    keys = table[list(unique_key)]
    return pd.DataFrame({
        "h1": pd.util.hash_pandas_object(keys, index=False, hash_key=_HASH_KEYS[0]).to_numpy(),
        "h2": pd.util.hash_pandas_object(keys, index=False, hash_key=_HASH_KEYS[1]).to_numpy(),
        "source_line": table["source_line"].to_numpy(dtype=np.int64),
        "split": np.asarray(split, dtype=np.int8),
        "label": table["label"].to_numpy(dtype=np.int8),
    })  # fmt: skip


def _duplicates_in(keys: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``keys`` whose key an earlier line has, with that line."""
    keys = keys.sort_values("source_line", kind="stable")
    later = keys.duplicated(["h1", "h2"], keep="first").to_numpy()
    first = keys.groupby(["h1", "h2"], sort=False)["source_line"].transform("first").to_numpy()
    return keys[later].assign(first_line=first[later])[["source_line", "first_line", "split", "label"]]


def find_duplicates(keys: ParquetParts, ingestion: dict[str, Any]) -> pd.DataFrame:
    """Rows whose unique key an earlier line of the log already has, across batches
    (``source_line``, ``first_line``, ``split``, ``label``), in line order.

    The key hashes of all batches (:func:`key_hashes`) are spread over buckets by hash,
    about ``ingestion.duplicate_bucket_rows`` rows each, written to a
    temporary folder and each bucket sorted by line in memory: memory stays bounded
    whatever the log's length, and the result is that of one sort of every key.
    """
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket_rows = int(ingestion.get("duplicate_bucket_rows", 4_000_000))
    if bucket_rows < 1:
        raise ValueError(f"ingestion.duplicate_bucket_rows={bucket_rows} must be >= 1")
    empty = pd.DataFrame({c: pd.Series(dtype=KEY_COLUMNS[c]) for c in ("source_line", "split", "label")}).assign(
        first_line=pd.Series(dtype="int64"))[["source_line", "first_line", "split", "label"]]  # fmt: skip
    files = [f for f in keys.files if pq.read_metadata(f).num_rows]
    buckets = -(-len(keys) // bucket_rows)
    if not files:
        return empty
    if buckets <= 1:
        found = [_duplicates_in(pa.concat_tables([pq.read_table(f) for f in files]).to_pandas())]
    else:
        with tempfile.TemporaryDirectory(prefix="dynamic-ctr-keys-") as spill:
            writers: dict[int, pq.ParquetWriter] = {}
            try:
                for path in files:
                    table = pq.read_table(path)
                    bucket = table.column("h1").to_numpy() % np.uint64(buckets)
                    for b in np.unique(bucket):
                        if int(b) not in writers:
                            writers[int(b)] = pq.ParquetWriter(f"{spill}/bucket-{int(b)}.parquet", table.schema)
                        writers[int(b)].write_table(table.filter(pa.array(bucket == b)))
            finally:
                for writer in writers.values():
                    writer.close()
            found = [_duplicates_in(pq.read_table(f"{spill}/bucket-{b}.parquet").to_pandas()) for b in sorted(writers)]
    out = pd.concat([empty, *found], ignore_index=True).astype({"source_line": "int64", "first_line": "int64"})
    logger.info("%d rows repeat the unique key of an earlier line (across %d bucket(s))", len(out), max(buckets, 1))
    return out.sort_values("source_line", kind="stable").reset_index(drop=True)


def quarantine_duplicates_stream(
    duplicates: pd.DataFrame, batches: pd.DataFrame, train: ParquetParts, valid: ParquetParts, test: ParquetParts
) -> pd.DataFrame:
    """The quarantine records of the duplicates found across batches, as the adapter
    writes them for a batch's own (file, line, reason naming the key and the line that
    has it first, the row); the parts are read only when there are duplicates."""
    columns = ["file", "line", "reason", "row"]
    if duplicates.empty:
        return Quarantine().frame()
    path = str(batches["path"].iloc[0])
    keys = json.loads(batches["unique_key"].iloc[0])
    first_line = dict(zip(duplicates["source_line"], duplicates["first_line"]))
    records = []
    for parts in (train, valid, test):
        for part in parts:
            rows = part[part["source_line"].isin(first_line)]
            if rows.empty:
                continue
            lines = rows["source_line"].tolist()
            reasons, bodies = duplicate_records(rows, keys, [first_line[line] for line in lines])
            records += [(path, line, reason, body) for line, reason, body in zip(lines, reasons, bodies)]
    frame = pd.DataFrame(records, columns=columns).sort_values("line", kind="stable").reset_index(drop=True)
    if len(frame) != len(duplicates):
        raise ValueError(f"{len(duplicates)} duplicate rows were found but {len(frame)} are in the streamed parts")
    return frame


def summarise_ingestion(
    batches: pd.DataFrame, duplicates: pd.DataFrame, ingestion: dict[str, Any], split_params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The streamed log's schema, ingestion report, ingestion gate and split summary,
    from the batch records less the duplicates found across batches (the same reports
    the in-memory pipelines write)."""
    if batches.empty:
        raise ValueError("the raw stream yielded no batch")
    schemas = set(batches["schema"])
    if len(schemas) != 1:
        raise ValueError(f"the adapter gave {len(schemas)} different schemas across batches")
    by_reason: dict[str, int] = {}
    set_missing: dict[str, int] = {}
    for text, missing in zip(batches["quarantined_by_reason"], batches["values_set_missing"]):
        for reason, n in json.loads(text).items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        for column, n in json.loads(missing).items():
            set_missing[column] = set_missing.get(column, 0) + n
    if len(duplicates):
        by_reason["duplicate key"] = by_reason.get("duplicate key", 0) + len(duplicates)
        by_reason = dict(sorted(by_reason.items()))
    dropped = {s: duplicates[duplicates["split"] == i] for i, s in enumerate(SPLITS)}
    path = str(batches["path"].iloc[0])
    rows = int(batches["rows_kept"].sum()) - len(duplicates)
    positives = sum(int(batches[f"positives_{s}"].sum()) - int(dropped[s]["label"].sum()) for s in SPLITS)
    files = {path: file_report(int(batches["rows_read"].sum()), rows, by_reason, set_missing, True)}
    notes: dict[str, Any] = {}
    for text in batches["notes"]:  # counts add up over the batches; texts are the same in each
        for key, value in json.loads(text).items():
            notes[key] = notes.get(key, 0) + value if isinstance(value, int | float) else value
    report = ingestion_report(ingestion, files, rows, positives / rows if rows else None, {**notes, "batches": len(batches)})
    check = quarantine_verdict(rows, report)
    split = _split_params(split_params)
    sizes = {s: int(batches[f"rows_{s}"].sum()) - len(dropped[s]) for s in SPLITS}
    if min(sizes.values()) == 0:
        raise ValueError(f"features.split.ratios={list(split.ratios)} leave an empty part: {sizes}")
    summary = {
        "method": split.method,
        "seed": split.seed,
        "rows": sizes,
        "positive_rate": {s: (int(batches[f"positives_{s}"].sum()) - int(dropped[s]["label"].sum())) / sizes[s] for s in SPLITS},
    }
    return json.loads(next(iter(schemas))), report, check, summary


def _without(part: pd.DataFrame, duplicate_lines: set[int]) -> pd.DataFrame:
    """``part`` less the rows found to be duplicates across batches (by line)."""
    if not duplicate_lines:
        return part
    return part[~part["source_line"].isin(duplicate_lines)].reset_index(drop=True)


def fit_stream(
    train: ParquetParts,
    duplicates: pd.DataFrame,
    table_schema: dict[str, Any],
    ingestion_check: dict[str, Any],
    encoder_params: dict[str, Any],
    roles: dict[str, Any] | None,
    domain_params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], pd.DataFrame]:
    """Fit the feature encoder, the domains and the activity groups from counts of the
    training parts, read one at a time.

    Returns the feature encoder (JSON), the feature spec, the domain encoder and the
    activity-group table, as the ``features`` and ``domains`` pipelines write them.
    """
    if not ingestion_check.get("passed"):
        raise ValueError(f"the streamed log did not pass the ingestion check: {ingestion_check}")
    schema = TableSchema.from_dict(table_schema)
    if schema.item_aggregated:
        raise ValueError(
            f"columns {list(schema.item_aggregated)} are aggregated per item over the whole training split; "
            "the streaming pipeline does not build item-level lists"
        )
    params = EncoderParams(**encoder_params)
    domains = DomainParams.from_dict(domain_params)
    counts = None
    support = pd.Series(dtype="int64")
    activity = pd.Series(dtype="int64")
    duplicate_lines = set(duplicates["source_line"].tolist())
    for part in train:
        part = _without(part, duplicate_lines)
        counts = merge_counts(counts, count_fields(part, schema))
        support = support.add(domain_keys(part, domains.features).value_counts(), fill_value=0)
        if domains.frequency_key is not None:
            activity = activity.add(part.groupby(domains.frequency_key, sort=False).size(), fill_value=0)
    if counts is None:
        raise ValueError("the training split has no parts")
    encoder = FeatureEncoder.from_counts(counts, schema, params)
    spec = spec_with_roles(encoder.feature_spec().to_dict(), roles)
    domain_encoder = DomainEncoder.from_support(support.astype("int64"), domains)
    if domains.frequency_key is None:
        groups = no_frequency_groups()
    else:
        groups = frequency_groups_from_counts(activity.astype("int64"), domains.frequency_key, domains.frequency_groups)
        groups = with_key_index(groups, encoder.to_dict(), domains.frequency_key)
    return encoder.to_dict(), spec, domain_encoder.to_dict(), groups


def encode_stream(
    feature_encoder: dict[str, Any], domain_encoder: dict[str, Any], groups: pd.DataFrame, primary: ParquetParts,
    duplicates: pd.DataFrame,
) -> Iterator[tuple[Any, ...]]:
    """Encode one split part by part, with its domain and activity group.

    Yields Parts of the model input and of its statistics (long format: per field the
    rows holding an unseen value or a cut list; per domain the samples and clicks).
    """
    encoder = FeatureEncoder.from_dict(feature_encoder)
    domains = DomainEncoder.from_dict(domain_encoder)
    key = domains.params.frequency_key
    group_of = dict(zip(groups["key"], groups["group"])) if key is not None else {}
    duplicate_lines = set(duplicates["source_line"].tolist())
    for part in primary:
        part = _without(part, duplicate_lines)
        encoded, stats = encoder.transform(part, passthrough=("source_line",))
        frame = with_domain_columns(encoded, part, domains, key, group_of)
        per_domain = frame.groupby(DOMAIN_FIELD).agg(samples=("label", "size"), clicks=("label", "sum"))
        rows = [("field", name, s["oov_rows"], s["truncated_rows"]) for name, s in stats.items()]
        rows += [("domain", str(d), int(r["samples"]), int(r["clicks"])) for d, r in per_domain.iterrows()]
        rows.append(("rows", "", len(frame), 0))
        yield Part(frame), Part(pd.DataFrame(rows, columns=["kind", "name", "a", "b"]))
    yield END, END


def summarise_encoding(
    base_feature_spec: dict[str, Any], domain_encoder: dict[str, Any], train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """The encoding report, the models' feature spec and the per-domain statistics,
    from the parts' statistics."""
    domains = DomainEncoder.from_dict(domain_encoder)
    report: dict[str, Any] = {}
    per_domain: dict[str, pd.DataFrame] = {}
    for split, stats in zip(SPLITS, (train, valid, test)):
        fields = stats[stats["kind"] == "field"].groupby("name", sort=False)[["a", "b"]].sum()
        report[split] = {
            "rows": int(stats.loc[stats["kind"] == "rows", "a"].sum()),
            "fields": {name: {"oov_rows": int(r["a"]), "truncated_rows": int(r["b"])} for name, r in fields.iterrows()},
        }
        dom = stats[stats["kind"] == "domain"].astype({"a": "int64", "b": "int64"})
        dom = dom.assign(domain=dom["name"].astype(int)).groupby("domain")[["a", "b"]].sum()
        per_domain[split] = dom.rename(columns={"a": "samples", "b": "clicks"})
    spec = model_feature_spec(base_feature_spec, domains, domains.params.frequency_key)
    return report, spec, domain_table_from_counts(per_domain, domains.names)
