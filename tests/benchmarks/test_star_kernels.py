"""benchmarks/star_kernels.py runs end to end on tiny settings: both LazyAdam paths, the three
forms of STAR's products (which the script checks equal before timing them) and the profile.
(The numbers are not checked here: speed is measured by the benchmark, not by tests.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "star_kernels.py"


def test_every_table_is_printed():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--domains", "30", "--batch", "64", "--row-widths", "16,32", "--repeats", "1",
         "--profile"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| 16 |" in out and "| 32 |" in out  # a LazyAdam row per width
    for form in ("grouped GEMM", "size classes, weights gathered", "size classes, weights laid out"):
        assert f"| {form} |" in out, form
    assert "STAR training step at P=30 under the profiler" in out and "| aten::" in out
