"""Ingestion + encoding at 1M-20M Criteo rows: time and peak memory against a floor.

The 10,000-row Criteo sample (from the data root; it may not be shipped) is tiled to
each ``--rows`` size in a temporary file. Each measurement runs in a fresh process, so
its peak RSS is its own:

- ``floor``: bare pyarrow, streaming: pyarrow's threaded CSV reader parses the TSV
  32 MiB of lines at a time and dictionary-encodes every column of each batch (no
  validation, no split, no vocabulary, nothing written): the least any
  reader-and-encoder does per row;
- ``stream``: ``kedro run --env criteo --pipeline stream_data --params raw_file=<file>``
  in a throw-away copy of the project: read in batches, type and check every row
  (quarantine), split by hash, write the clean parts, count, fit the encoders and
  domains, encode every part and write the model inputs (Parquet parts);
- ``memory`` (``--with-memory``, sizes up to 5M): ``kedro run --env criteo --pipeline
  data``, the in-memory pipelines, for comparison.

Usage::

    DYNAMIC_CTR_DATA_ROOT=../shared/datasets python benchmarks/ingest_encode.py --rows 1000000 5000000 20000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = "criteo-sample/dac_train_first10000.txt"
PROJECT = Path(__file__).resolve().parents[1]
NAMES = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]


def describe() -> str:
    import platform

    import pyarrow

    cpu = platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"machine: {cpu}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB RAM, Python {platform.python_version()}, pyarrow {pyarrow.__version__}"


def make_input(rows: int, folder: Path) -> Path:
    root = Path(os.environ.get("DYNAMIC_CTR_DATA_ROOT", "data/external"))
    sample = root / SAMPLE
    if not sample.is_file():
        sys.exit(f"{sample} not found: set DYNAMIC_CTR_DATA_ROOT to the folder holding {SAMPLE}")
    lines = sample.read_bytes().splitlines(keepends=True)
    target = folder / f"criteo_{rows}.txt"
    with target.open("wb") as out:
        for start in range(0, rows, len(lines)):
            out.writelines(lines[: min(len(lines), rows - start)])
    return target


def floor(path: Path) -> dict:
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    start = time.perf_counter()
    rows = 0
    with path.open("rb") as f:
        rest = b""
        while True:  # 32 MiB of whole lines at a time, parsed by pyarrow's threaded reader
            block = f.read(32 << 20)
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if not data:
                break
            table = pacsv.read_csv(
                io.BytesIO(data[:cut]),
                read_options=pacsv.ReadOptions(column_names=NAMES),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in NAMES}),
            )
            encoded = [table.column(i).dictionary_encode() for i in range(table.num_columns)]
            rows += len(encoded[0])
            rest = data[cut:]
    return {"rows": rows, "seconds": time.perf_counter() - start}


def kedro_run(path: Path, pipeline: str) -> dict:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = Path(tempfile.mkdtemp(prefix="ingest_bench_"))
    try:
        shutil.copytree(PROJECT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        (project / "src").mkdir()
        for name in ("pyproject.toml", ".telemetry"):
            shutil.copy(PROJECT / name, project / name)
        os.chdir(project)
        bootstrap_project(project)
        start = time.perf_counter()
        with KedroSession.create(project_path=project, env="criteo", runtime_params={"raw_file": str(path)}) as session:
            session.run(pipeline_names=[pipeline])
        seconds = time.perf_counter() - start
        reports = sorted((project / "data/08_reporting/criteo/ingestion_report.json").glob("*/*.json"))
        report = json.loads(reports[-1].read_text())
        return {"rows": report["files"][str(path)]["rows_read"], "kept": report["rows"], "seconds": seconds,
                "batches": report["notes"].get("batches")}
    finally:
        shutil.rmtree(project, ignore_errors=True)


def _child(kind: str, path: str) -> None:
    import logging

    logging.disable(logging.INFO)
    result = floor(Path(path)) if kind == "floor" else kedro_run(Path(path), {"stream": "stream_data", "memory": "data"}[kind])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], check=True, capture_output=True, text=True,
                         env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--with-memory", action="store_true", help="also run the in-memory pipelines (sizes <= 5M)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    print(describe())
    print(f"{'rows':>11s} {'run':>7s} {'seconds':>8s} {'rows/s':>10s} {'peak RSS MB':>12s} {'x floor':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = make_input(rows, Path(tmp))
            kinds = ["floor", "stream"] + (["memory"] if args.with_memory and rows <= 5_000_000 else [])
            results = {kind: measure(kind, path) for kind in kinds}
            for kind, r in results.items():
                ratio = r["seconds"] / results["floor"]["seconds"]
                print(f"{rows:11,d} {kind:>7s} {r['seconds']:8.1f} {r['rows'] / r['seconds']:10,.0f} {r['peak_rss_mb']:12,.0f} {ratio:7.2f}x",
                      flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
