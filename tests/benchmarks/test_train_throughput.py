"""benchmarks/train_throughput.py's device harness (``--device cuda`` on a GPU) runs its
eager cells on the CPU with ``--harness``: every contender builds, trains and is summarised.
(The numbers are not checked here: speed is measured by the benchmark, not by tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_device_harness_runs_every_contender_on_the_cpu(tmp_path):
    contenders = "bare,bare_scatter,wdl,wdl_apg,dcnv2_apg,xdeepint,dynint_dgp"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--harness", "--contenders", contenders, "--batches", "256",
         "--blocks", "1", "--block-ms", "1", "--budget-s", "120", "--quiet", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "throughput.jsonl").read_text().splitlines()]
    # on the CPU: eager cells only (no graphs, no compile), fused then foreach Adam
    assert {r["contender"] for r in rows} == set(contenders.split(","))
    assert all(not r["graph"] and not r["compile"] and r["finite"] and r["samples_per_s"] > 0 for r in rows)
    assert "best lever setting per contender" in done.stdout and "target WDL+APG" not in done.stdout
    unknown = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--harness", "--contenders", "wld"],
                             capture_output=True, text=True, timeout=300, check=False)
    assert unknown.returncode != 0 and "unknown ['wld']" in unknown.stderr
