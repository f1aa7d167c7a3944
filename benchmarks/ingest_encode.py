"""Ingestion + encoding throughput on Criteo-format data, against a bare pyarrow floor.

The 10,000-row Criteo sample (from the data root; it may not be shipped) is tiled to
``--rows`` rows in a temporary folder. Two measurements then run side by side, each in
a fresh process so peak RSS is its own:

- ``floor``: pyarrow reads the TSV and dictionary-encodes every column (no validation,
  no split, no vocabulary, nothing written);
- ``pipeline``: what ``kedro run --env criteo`` does to the data, node functions
  called directly: read -> type and validate (quarantine) -> split -> fit the encoder
  on train -> encode the three splits -> write them as Parquet. Intermediates are
  released where Kedro releases them (after the last node that reads them), so the
  peak RSS is that of the hungriest step, as in a run.

Usage::

    DYNAMIC_CTR_DATA_ROOT=../shared/datasets python benchmarks/ingest_encode.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = "criteo-sample/dac_train_first10000.txt"


def make_input(rows: int, folder: Path) -> Path:
    root = Path(os.environ.get("DYNAMIC_CTR_DATA_ROOT", "data/external"))
    sample = root / SAMPLE
    if not sample.is_file():
        sys.exit(f"{sample} not found: set DYNAMIC_CTR_DATA_ROOT to the folder holding {SAMPLE}")
    lines = sample.read_bytes().splitlines(keepends=True)
    target = folder / "criteo_tiled.txt"
    with target.open("wb") as out:
        for start in range(0, rows, len(lines)):
            out.writelines(lines[: min(len(lines), rows - start)])
    return target


def floor(path: Path, out_dir: Path) -> dict:
    import pyarrow.csv as pacsv

    start = time.perf_counter()
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                           parse_options=pacsv.ParseOptions(delimiter="\t"))
    encoded = [table.column(n).dictionary_encode() for n in names]
    assert len(encoded) == 40
    return {"rows": table.num_rows, "seconds": time.perf_counter() - start}


def pipeline(path: Path, out_dir: Path) -> dict:
    from dynamic_ctr.data.adapters import CRITEO_COLUMNS, criteo
    from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder
    from dynamic_ctr.data.raw import RawFileConfig, read_raw
    from dynamic_ctr.data.split import SplitParams, split_frame

    start = time.perf_counter()
    marks = {}
    raw = read_raw(RawFileConfig(filepath=str(path), sep="\t", header=False, quoted=False, names=CRITEO_COLUMNS))
    marks["read"] = time.perf_counter() - start
    result = criteo({"clicks": raw}, {})
    del raw  # as between Kedro nodes: the raw text is released once the clean table exists
    marks["validate"] = time.perf_counter() - start
    rows, quarantined = len(result.table), len(result.quarantine.frame())
    train, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    schema = result.schema
    del result
    encoder = FeatureEncoder.fit(train, schema, EncoderParams(min_count=2))
    marks["fit"] = time.perf_counter() - start
    for name, frame in (("train", train), ("valid", valid), ("test", test)):
        encoded, _ = encoder.transform(frame)
        encoded.to_parquet(out_dir / f"{name}.parquet", index=False)
        del encoded
    marks["encode_write"] = time.perf_counter() - start
    return {"rows": rows, "quarantined": quarantined, "seconds": marks["encode_write"], "marks": marks}


def _child(kind: str, path: str, out_dir: str) -> None:
    fn = {"floor": floor, "pipeline": pipeline}[kind]
    result = fn(Path(path), Path(out_dir))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = make_input(args.rows, Path(tmp))
        results = {}
        for kind in ("floor", "pipeline"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), tmp], check=True, capture_output=True, text=True)
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    f, p = results["floor"], results["pipeline"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"rows: {args.rows:,} (Criteo sample tiled)")
    print(f"{'':10s} {'seconds':>8s} {'rows/s':>12s} {'peak RSS MB':>12s}")
    for name, r in (("floor", f), ("pipeline", p)):
        print(f"{name:10s} {r['seconds']:8.2f} {r['rows'] / r['seconds']:12,.0f} {r['peak_rss_mb']:12.0f}")
    print(f"pipeline / floor time: {p['seconds'] / f['seconds']:.2f}x")
    print("pipeline stages (cumulative s): " + ", ".join(f"{k} {v:.2f}" for k, v in p["marks"].items()))


if __name__ == "__main__":
    main()
