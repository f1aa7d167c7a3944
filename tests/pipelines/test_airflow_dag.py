"""The Airflow DAG that `kedro airflow create` generates for the retrain pipeline (README,
"Retraining on a schedule") imports under Airflow, on the schedule of conf/base/airflow.yml,
and its tasks run exactly the pipeline's nodes (kedro-airflow and Airflow are test
dependencies only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kedro_airflow")
pytest.importorskip("airflow")

LIST_DAG = """
import json, sys
from airflow.models import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": {d.dag_id: {"tasks": d.task_ids, "schedule": getattr(d.timetable, "expression", None),
                                      "max_active_runs": d.max_active_runs} for d in bag.dags.values()}}))
"""


def test_generated_retrain_dag_imports_and_matches_the_pipeline(project: Path, tmp_path: Path) -> None:
    from kedro.framework.project import pipelines

    dags = tmp_path / "dags"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "KEDRO_DISABLE_TELEMETRY": "1"}
    subprocess.run(
        [sys.executable, "-m", "kedro", "airflow", "create", "--pipelines", "retrain", "--group-by", "memory", "--target-dir", str(dags)],
        cwd=project, env=env, check=True, capture_output=True, text=True,
    )
    (dag_file,) = dags.glob("*.py")
    listed = subprocess.run([sys.executable, "-c", LIST_DAG, str(dags)], cwd=project, env=env, check=True, capture_output=True, text=True)
    result = json.loads(listed.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    (dag,) = result["dags"].values()
    assert dag["schedule"] == "0 6 * * 1" and dag["max_active_runs"] == 1
    # each task runs a group of nodes joined by in-memory datasets; together, every node once
    groups = [json.loads("[" + g + "]") for g in re.findall(r"node_names=\[(.*?)\]", dag_file.read_text())]
    assert len(groups) == len(dag["tasks"])
    ran = [name for group in groups for name in group]
    assert sorted(ran) == sorted(n.name for n in pipelines["retrain"].nodes)
