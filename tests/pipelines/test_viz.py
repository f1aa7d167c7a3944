"""`kedro viz build` (README, "What a run writes") renders every registered pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kedro_viz_build_renders_the_suite_pipelines(project: Path) -> None:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    kedro = [sys.executable, "-m", "kedro"]
    result = subprocess.run([*kedro, "viz", "build"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    graph = json.loads((project / "build/api/main").read_text())
    names = {node["name"] for node in graph["nodes"]}
    assert {"plan_suite", "apg.suite_plan", "train_variant", "wdl_apg.trained_model", "apg.report_summary"} <= names
    assert {p["id"] for p in graph["pipelines"]} >= {"__default__", "apg", "data", "scoring"}
