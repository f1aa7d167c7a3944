"""benchmarks/multidomain_step.py runs end to end on tiny settings: every contender, the
STAR same-domains case, the optimiser comparison, the serving check and the targets.
(The numbers are not checked here: speed is measured by the benchmark, not by tests.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multidomain_step.py"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch", "64", "--repeats", "1", "--min-block-ms", "1",
         "--quiet", "0", "--wait-budget", "0", "--retries", "0", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_contender_and_report_line():
    out = _run("--domains", "3,6")
    for name in ("dnn", "star", "star-bmm", "mmoe", "apg", "adasparse", "adasparse-domain", "eq2-floor"):
        assert f"| 3 | {name} |" in out and f"| 6 | {name} |" in out, name
    assert "serving check: pruned == masked" in out
    assert "STAR at P=6 on batches of the 3 most frequent domains" in out
    assert "one optimiser step: SparseAdam" in out
    assert "STAR at 1,000 domains" not in out  # that target needs P = 10 and 1,000
    assert "pruned serving form >= 1.15x faster" in out
    assert "[P=6] (floor) eq. 2 alone" in out


def test_contenders_subset_and_unknown_names():
    out = _run("--domains", "4", "--contenders", "adasparse-domain")
    assert "| 4 | dnn |" in out and "| 4 | adasparse-domain |" in out and "| 4 | star |" not in out
    done = subprocess.run([sys.executable, str(SCRIPT), "--contenders", "stra"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "unknown ['stra']" in done.stderr


def test_device_cuda_without_a_gpu_is_refused_by_name():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: test_on_cuda runs the script there")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "--device cuda: no CUDA device" in done.stderr


@pytest.mark.cuda
def test_on_cuda():
    """Every contender, the optimisers and the serving check with models and batches on the GPU."""
    out = _run("--domains", "3,6", "--device", "cuda")
    assert "GPU" in out.splitlines()[0]  # the machine line names the device
    for name in ("dnn", "star", "mmoe", "adasparse-domain", "eq2-floor"):
        assert f"| 6 | {name} |" in out, name
    assert "serving check: pruned == masked" in out
