"""The streaming pipeline (``stream_data``) writes what the in-memory data pipelines write.

On the real Criteo sample with malformed rows added, read in small batches: the same
model inputs (every id of every row), encoders, domains, quarantine and reports as
``kedro run --pipeline data``, because both split by the same hash and the encoders
are fitted from the same counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession

from dynamic_ctr.data.raw import RawFileConfig
from dynamic_ctr.io.parquet_parts import END
from dynamic_ctr.io.raw_source import RawStream
from dynamic_ctr.pipelines.streaming.nodes import ingest_stream

CRITEO = "criteo-sample/dac_train_first10000.txt"
AVAZU = "avazu-sample/avazu_train_first8999.csv"


def _versions(root: Path, relative: str) -> list[Path]:
    return [p / Path(relative).name for p in sorted((root / relative).iterdir()) if p.is_dir()]


def _json_pair(root: Path, relative: str) -> tuple[dict, dict]:
    memory, streamed = _versions(root, relative)
    return json.loads(memory.read_text()), json.loads(streamed.read_text())


def _with_bad_rows(source: Path, target: Path, sep: bytes) -> Path:
    lines = source.read_bytes().splitlines(keepends=True)
    lines[5] = sep.join([b"1", b"2", b"3"]) + b"\n"  # too few fields
    if sep == b"\t":  # Criteo: label first
        lines[4000] = b"7" + lines[4000][1:]  # label 7
        lines[8000] = lines[8000].replace(b"\t", b"\tnot-a-number\t", 1).replace(b"\t", b"", 2)  # I1 not numeric
    else:  # Avazu: id, click, hour, ...
        lines[4000] = lines[4000].replace(b",", b",7,", 1).replace(b",", b"", 2)  # click 7
        lines[8000] = lines[7990]  # a duplicate id, in the same batch (the adapter finds it)
        lines[8500] = lines[100]  # a duplicate id, 5 batches later (find_duplicates finds it)
    target.write_bytes(b"".join(lines))
    return target


@pytest.mark.slow
@pytest.mark.parametrize(("env", "sample", "batches", "bad_lines"), [
    ("criteo", CRITEO, 10, [6, 4001, 8001]),
    ("avazu", AVAZU, 6, [6, 4001, 8001, 8501]),
])
def test_stream_data_writes_what_the_in_memory_pipelines_write(
    env: str, sample: str, batches: int, bad_lines: list[int], project: Path, data_root: Path, monkeypatch, tmp_path: Path
) -> None:
    raw = _with_bad_rows(data_root / sample, tmp_path / Path(sample).name, b"\t" if env == "criteo" else b",")
    monkeypatch.setenv("DYNAMIC_CTR_DATA_ROOT", str(data_root))
    params = {"raw_file": str(raw), "batch_mb": 0.25}  # the samples in several batches
    for pipeline in ("data", "stream_data"):  # `kedro run --env <env> --pipeline <name> --params ...`
        with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
            session.run(pipeline_names=[pipeline])

    for split in ("train", "valid", "test"):
        memory, streamed = (pd.read_parquet(p) for p in _versions(project, f"data/05_model_input/{env}/{split}.parquet"))
        assert len(memory) > 800
        pd.testing.assert_frame_equal(streamed, memory)
    for name in ("04_feature/{env}/feature_encoder.json", "04_feature/{env}/domain_encoder.json",
                 "05_model_input/{env}/feature_spec.json", "08_reporting/{env}/encoding_report.json",
                 "03_primary/{env}/split_summary.json", "02_intermediate/{env}/table_schema.json",
                 "02_intermediate/{env}/ingestion_check.json"):
        memory, streamed = _json_pair(project, f"data/{name.format(env=env)}")
        assert streamed == memory, name
    pd.testing.assert_frame_equal(*(pd.read_parquet(p) for p in _versions(project, f"data/04_feature/{env}/frequency_groups.parquet")))
    memory, streamed = _json_pair(project, f"data/08_reporting/{env}/ingestion_report.json")
    notes = streamed.pop("notes")
    assert notes.pop("batches") == batches and memory.pop("notes") == {} and notes == {}
    assert streamed == memory
    (report,) = streamed["files"].values()
    assert report["rows_quarantined"] == len(bad_lines)

    quarantine_memory = pd.read_parquet(_versions(project, f"data/02_intermediate/{env}/ingestion_quarantine.parquet")[0])
    across = pd.read_parquet(_versions(project, f"data/02_intermediate/{env}/stream_quarantine_duplicates.parquet")[0])
    assert across["line"].tolist() == ([] if env == "criteo" else [8501])  # the batches' own quarantine has the rest
    quarantine_streamed = pd.concat([pd.read_parquet(_versions(project, f"data/02_intermediate/{env}/stream_quarantine")[0]), across])
    pd.testing.assert_frame_equal(quarantine_streamed.sort_values("line").reset_index(drop=True),
                                  quarantine_memory.sort_values("line").reset_index(drop=True), check_dtype=False)
    assert sorted(quarantine_streamed["line"].tolist()) == bad_lines
    stats = pd.concat(pd.read_parquet(p) for p in _versions(project, f"data/08_reporting/{env}/domain_stats.parquet"))
    assert len(stats) == 2 * len(stats.drop_duplicates())  # the two runs' per-domain tables are equal


def test_streaming_refuses_what_it_cannot_do_before_reading_a_row(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    stream = RawStream({"ratings": RawFileConfig(filepath=str(path))}, 1 << 20)
    hashed = {"method": "hash", "ratios": [0.7, 0.1, 0.2], "seed": 1}
    with pytest.raises(ValueError, match=r"movielens_latest.* joins several files .* streaming adapters: \['avazu', 'criteo'"):
        next(ingest_stream(stream, {"adapter": "movielens_latest"}, hashed))
    with pytest.raises(ValueError, match=r"features.split.method='random': the streaming pipeline splits each row alone"):
        next(ingest_stream(stream, {"adapter": "criteo"}, {**hashed, "method": "random"}))
    with pytest.raises(ValueError, match=r"unknown features.split parameter\(s\) \['keys'\]"):
        next(ingest_stream(stream, {"adapter": "criteo"}, {**hashed, "keys": ["id"]}))
    with pytest.raises(ValueError, match=r"features.encoder.numeric_buckets='deciles'"):
        next(ingest_stream(stream, {"adapter": "criteo"}, hashed, {"numeric_buckets": "deciles"}))


def test_a_domain_column_the_log_lacks_stops_the_stream_at_its_first_batch(data_root: Path) -> None:
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    cfg = RawFileConfig(filepath=str(data_root / CRITEO), sep="\t", header=False, quoted=False, names=tuple(names))
    chunks = ingest_stream(RawStream({"clicks": cfg}, 300_000), {"adapter": "criteo"}, {"method": "hash"}, {}, {"features": ["C99"]})
    with pytest.raises(ValueError, match=r"domains.features: column 'C99' is not in the table"):
        next(chunks)


def test_ingest_stream_yields_one_part_per_batch_then_publishes(data_root: Path) -> None:
    """Memory holds one batch: the node is a generator over the raw batches, and every
    output gets END once, after the last batch."""
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    cfg = RawFileConfig(filepath=str(data_root / CRITEO), sep="\t", header=False, quoted=False, names=tuple(names))
    chunks = list(ingest_stream(RawStream({"clicks": cfg}, 300_000), {"adapter": "criteo"}, {"method": "hash"}))
    assert chunks[-1] == (END,) * 6 and len(chunks) == 10  # 9 batches of ~300 kB
    rows = sum(c[0].rows + c[1].rows + c[2].rows for c in chunks[:-1])
    assert rows == 10_000
    shares = [sum(c[i].rows for c in chunks[:-1]) / rows for i in range(3)]
    assert shares == pytest.approx([0.7, 0.1, 0.2], abs=0.02)


@pytest.mark.slow
def test_a_suite_trains_on_a_split_read_by_row_group(project: Path, data_root: Path, monkeypatch, caplog) -> None:
    """`kedro run --env criteo --pipeline stream_dynint` with a training split over the
    in-memory limit (``training.in_memory_limit_mb``, here 0.1 MB against 3000 rows' 0.9 MB):
    every variant trains from the row groups (smoke budget) and is reported."""
    catalog = project / "conf/criteo/catalog.yml"
    catalog.write_text(catalog.read_text().replace("shuffle_buffer_rows: 2000000", "shuffle_buffer_rows: 2000"))
    monkeypatch.setenv("DYNAMIC_CTR_DATA_ROOT", str(data_root))
    smoke = {"training": {"limits": {"n_trials": 1, "max_epochs": 1, "seeds": 1, "train_rows": 3000}, "in_memory_limit_mb": 0.1},
             "batch_mb": 0.5}
    with KedroSession.create(project_path=project, env="criteo", runtime_params=smoke) as session:
        session.run(pipeline_names=["stream_dynint"])
    summary = json.loads(_versions(project, "data/08_reporting/criteo/dynint/summary.json")[-1].read_text())
    assert len(summary["variants"]) >= 10
    read = [r.getMessage() for r in caplog.records if "read by row group" in r.getMessage()]
    assert len(read) == len(summary["variants"]) and all("read by row group: 3000 rows (" in m and "shuffle buffer 2000 rows" in m for m in read)
    assert all(0.5 < v["test_auc"] < 1 for v in summary["variants"]), [(v["name"], v["test_auc"]) for v in summary["variants"]]
    parts = list((project / "data/05_model_input/criteo/train.parquet").glob("*/train.parquet/part-*.parquet"))
    assert len(parts) >= 4  # the split the variants read group by group


def test_find_duplicates_in_buckets_equals_one_sort_of_every_key(tmp_path: Path) -> None:
    """Keys repeated within and across batches: spread over buckets of 500 rows (bounded
    memory) or all in one, the later rows of each key are found, with the key's first
    line; the same as pandas' duplicated() over the whole log."""
    import numpy as np
    from kedro.io import Version

    from dynamic_ctr.io.parquet_parts import ParquetPartsDataset, Part
    from dynamic_ctr.pipelines.streaming.nodes import find_duplicates, key_hashes

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3000, size=6000).astype(str)  # about 1/3 of the rows repeat an earlier id
    log = pd.DataFrame({"id": pd.array(ids, dtype="string[pyarrow]"), "source_line": np.arange(2, 6002),
                        "label": rng.integers(0, 2, size=6000)})  # fmt: skip
    written = ParquetPartsDataset(filepath=str(tmp_path / "keys"), version=Version(None, "2026-01-01T00.00.00.000Z"))
    for start in range(0, len(log), 700):  # batches; within a batch the adapter has removed repeats already
        batch = log.iloc[start : start + 700]
        batch = batch[~batch.duplicated("id")]
        written.save(Part(key_hashes(batch.reset_index(drop=True), ("id",), np.arange(len(batch)) % 3)))
    written.save(END)
    keys = ParquetPartsDataset(filepath=str(tmp_path / "keys"), lazy=True, version=Version(None, None)).load()

    kept = pd.concat([pd.read_parquet(f) for f in keys.files])
    ids_of = dict(zip(log["source_line"], log["id"]))
    expected = pd.DataFrame({"source_line": kept["source_line"], "id": kept["source_line"].map(ids_of)})
    later = expected.duplicated("id", keep="first")
    first = expected.groupby("id")["source_line"].transform("first")
    assert later.sum() > 500
    for bucket_rows in (500, 10**7):
        found = find_duplicates(keys, {"duplicate_bucket_rows": bucket_rows})
        assert found["source_line"].tolist() == expected.loc[later, "source_line"].tolist(), bucket_rows
        assert found["first_line"].tolist() == first[later].tolist(), bucket_rows
    with pytest.raises(ValueError, match="duplicate_bucket_rows=0 must be >= 1"):
        find_duplicates(keys, {"duplicate_bucket_rows": 0})
