"""The Spark data pipeline gives what the in-memory one gives, on the Criteo sample.

Both run on a copy of the sample with eight bad lines added (blank lines, a line of
empty fields, short and long rows, a bad label, an unparsable number, a missing label):
the in-memory side through the ``ingestion`` and ``features`` nodes, the Spark side
through ``spark_data``'s nodes in ``local[1]``, with the file cut into five blocks and
Arrow batches of 1,500 rows so that line numbering and every per-batch call are tested
across block and batch boundaries. Rows, quarantine, report, split, encoder JSON, feature
spec and encoded ids must be identical. A last test runs ``kedro run --env spark
--pipeline spark_data`` and then the pandas ``domains`` pipeline on its output.

Needs pyspark (the ``spark`` extra, not in ``test``: CI skips this file), Java 17+ and
the data root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed: the Spark pipeline needs `pip install -e '.[spark]'`")
if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
    pytest.skip("no Java runtime (java on PATH or JAVA_HOME): Spark needs Java 17+", allow_module_level=True)

from kedro.framework.session import KedroSession

from dynamic_ctr.data.adapters import CRITEO_COLUMNS
from dynamic_ctr.data.raw import RawFileConfig, read_raw
from dynamic_ctr.pipelines.features.nodes import encode_splits, fit_encoder, split_interactions
from dynamic_ctr.pipelines.ingestion.nodes import check_quarantine, ingest
from dynamic_ctr.pipelines.spark import nodes as spark_nodes

pytestmark = [
    pytest.mark.data_root,
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]

SAMPLE = "criteo-sample/dac_train_first10000.txt"
INGESTION = {"adapter": "criteo", "options": {}, "max_quarantine_share": 0.01}
SPLIT = {"method": "hash", "ratios": [0.7, 0.1, 0.2], "seed": 2024}
ENCODER = {"min_count": 2, "min_count_per_field": {}, "numeric_buckets": "log", "quantile_buckets": 32,
           "max_len": {}, "max_len_cap": 32, "chunk_rows": 1_000_000}
ROLES = {"context": None}
SPARK = {"master": "local[1]", "app_name": "dynamic-ctr-test", "config": {
    "spark.ui.enabled": False, "spark.ui.showConsoleProgress": False, "spark.sql.shuffle.partitions": 2,
    "spark.sql.files.maxPartitionBytes": "512k", "spark.sql.execution.arrow.maxRecordsPerBatch": 1500,
    "spark.driver.memory": "1g"}}
#: 0-based position in the sample -> the line inserted before it.
BAD_LINES = {100: "", 2000: "short", 3000: "label 2", 4500: "I1 abc", 6000: "no label", 7000: "long",
             8000: "empty fields", 9000: ""}
EXPECTED_REASONS = {
    101: "empty line: no fields",
    2002: "malformed row: expected 40 fields, found 39",
    3003: "bad label: label='2' is not 0 or 1",
    4504: "unparsable value: I1='abc' is not float",
    6005: "missing value: label is empty",
    7006: "malformed row: expected 40 fields, found 41",
    8007: "empty line: no fields",
    9008: "empty line: no fields",
}


def _bad_line(kind: str, good: list[str]) -> str:
    return {
        "": "", "short": "\t".join(good[:39]), "long": "\t".join([*good, "x"]),
        "label 2": "\t".join(["2", *good[1:]]), "I1 abc": "\t".join([good[0], "abc", *good[2:]]),
        "no label": "\t".join(["", *good[1:]]), "empty fields": "\t" * 39,
    }[kind]


@pytest.fixture(scope="module")
def raw_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose Criteo sample has the bad lines of ``BAD_LINES``."""
    lines = (data_root / SAMPLE).read_text(encoding="utf-8").splitlines()
    good = lines[10].split("\t")
    out = []
    for i, line in enumerate(lines):
        if i in BAD_LINES:
            out.append(_bad_line(BAD_LINES[i], good))
        out.append(line)
    root = tmp_path_factory.mktemp("criteo_root")
    (root / SAMPLE).parent.mkdir(parents=True)
    (root / SAMPLE).write_text("\n".join(out) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def in_memory(raw_root: Path) -> dict:
    """The ingestion and features nodes of the in-memory pipeline, split by hash."""
    raw = read_raw(RawFileConfig(filepath=str(raw_root / SAMPLE), sep="\t", header=False, quoted=False, names=CRITEO_COLUMNS))
    clean, quarantine, schema, report = ingest({"clicks": raw}, INGESTION)
    check = check_quarantine(clean, report)
    train, valid, test, summary = split_interactions(clean, schema, check, SPLIT)
    encoder, spec = fit_encoder(train, schema, ENCODER, ROLES)
    *encoded, encoding = encode_splits(encoder, train, valid, test)
    return {"clean": clean, "quarantine": quarantine, "schema": schema, "report": report, "check": check,
            "parts": (train, valid, test), "summary": summary, "encoder": encoder, "spec": spec,
            "encoded": encoded, "encoding": encoding}


@pytest.fixture(scope="module")
def on_spark(raw_root: Path) -> dict:
    """``spark_data``'s nodes, the outputs of each handed to the next (no catalog)."""
    started = time.perf_counter()
    session = spark_nodes.start_spark(SPARK)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    raw = spark.read.format("text").load(str(raw_root / SAMPLE))
    clean, quarantine, schema, report = spark_nodes.ingest_lines(session, raw, INGESTION)
    check = spark_nodes.check_ingestion(report)
    train, valid, test, summary = spark_nodes.split_rows(clean, schema, check, SPLIT)
    encoder, spec = spark_nodes.fit_encoder_spark(train, schema, ENCODER, ROLES)
    *encoded, encoding = spark_nodes.encode_splits_spark(encoder, train, valid, test)
    out = {
        "partitions": raw.rdd.getNumPartitions(), "clean": clean.toArrow(), "quarantine": quarantine.toPandas(),
        "schema": schema, "report": report, "check": check, "parts": tuple(p.toArrow() for p in (train, valid, test)),
        "summary": summary, "encoder": encoder, "spec": spec, "encoded": [e.toArrow() for e in encoded],
        "encoding": encoding,
    }
    out["seconds"] = time.perf_counter() - started
    print(f"spark_data nodes on the sample (local[1], JVM start included): {out['seconds']:.1f} s")
    yield out
    spark.stop()


def test_the_file_is_read_in_several_blocks(on_spark):
    assert on_spark["partitions"] == 5  # line numbers cross block boundaries


def test_same_clean_rows_quarantine_and_report(in_memory, on_spark):
    expected = pa.Table.from_pandas(in_memory["clean"], preserve_index=False)
    clean = on_spark["clean"].sort_by("source_line")
    assert clean.schema.types == expected.schema.types and clean.column_names == expected.column_names
    assert clean.num_rows == 10_000 and clean.equals(expected.cast(clean.schema))

    mine = on_spark["quarantine"].sort_values("line").reset_index(drop=True)
    theirs = in_memory["quarantine"].sort_values("line").reset_index(drop=True)
    assert dict(zip(mine["line"], mine["reason"])) == EXPECTED_REASONS
    pd.testing.assert_frame_equal(mine, theirs, check_dtype=False)
    assert mine["line"].dtype == "int64"

    assert on_spark["schema"] == in_memory["schema"]
    assert on_spark["report"] == in_memory["report"]
    assert on_spark["check"] == in_memory["check"]


def test_same_rows_in_each_part(in_memory, on_spark):
    assert on_spark["summary"] == in_memory["summary"]
    for mine, theirs in zip(on_spark["parts"], in_memory["parts"]):
        expected = pa.Table.from_pandas(theirs, preserve_index=False)
        assert mine.column("source_line").to_pylist() == expected.column("source_line").to_pylist()
        assert mine.equals(expected.cast(mine.schema))


def test_same_encoder_and_feature_spec(in_memory, on_spark):
    assert on_spark["encoder"] == in_memory["encoder"]
    assert on_spark["spec"] == in_memory["spec"]
    assert sum(len(f["vocab"]) for f in on_spark["encoder"]["fields"]) > 1000


def test_same_encoded_ids(in_memory, on_spark):
    assert on_spark["encoding"] == in_memory["encoding"]
    for mine, theirs in zip(on_spark["encoded"], in_memory["encoded"]):
        assert mine.column_names == list(theirs.columns)
        frame = mine.to_pandas()
        assert str(frame["label"].dtype) == "int8" and str(frame["source_line"].dtype) == "int64"
        assert all(str(frame[c].dtype) == "int32" for c in frame.columns if c not in ("label", "source_line"))
        merged = theirs.merge(frame, on="source_line", how="outer", suffixes=("", "_spark"), validate="one_to_one")
        assert len(merged) == len(theirs) == len(frame)
        for column in theirs.columns.drop("source_line"):
            assert (merged[column] == merged[f"{column}_spark"]).all(), column
        pd.testing.assert_frame_equal(frame, theirs)  # same order too


@pytest.mark.slow
def test_kedro_run_env_spark(project: Path, raw_root: Path, in_memory: dict, monkeypatch) -> None:
    """``kedro run --env spark --pipeline spark_data`` writes what the pandas catalog
    entries of training's inputs read, and the ``domains`` pipeline runs on it."""
    monkeypatch.setenv("DYNAMIC_CTR_DATA_ROOT", str(raw_root))
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro)] if kedro.is_file() else [sys.executable, "-m", "kedro"]
    started = time.perf_counter()
    done = subprocess.run([*command, "run", "--env", "spark", "--pipeline", "spark_data"], check=False, cwd=project,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"kedro run --env spark --pipeline spark_data: {seconds:.1f} s")
    with KedroSession.create(project_path=project, env="spark") as session:
        catalog = session.load_context().catalog
        for name, theirs in zip(("train", "valid", "test"), in_memory["encoded"]):
            pd.testing.assert_frame_equal(catalog.load(f"encoded_{name}"), theirs)
        # The same vocabularies; the params differ only by base's max_len {genres, tags},
        # which the soft merge of parameters keeps (fields this data set does not have).
        encoder, expected = catalog.load("feature_encoder"), json.loads(json.dumps(in_memory["encoder"]))
        assert encoder["fields"] == expected["fields"] and encoder["schema"] == expected["schema"]
        assert catalog.load("ingestion_report")["files"][str(raw_root / SAMPLE)]["rows_quarantined"] == 8
        session.run(pipeline_names=["domains"])
    model_input = max((project / "data/05_model_input/criteo_spark/train.parquet").iterdir()) / "train.parquet"
    assert len(pd.read_parquet(model_input)) == len(in_memory["encoded"][0])
