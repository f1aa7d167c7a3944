"""train -> fold -> report (and scoring) through a real KedroSession on the tiny data.

The copied project keeps three variants (a base, an over-parameterised self-wise APG and
a group-wise APG), which covers every node kind in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.framework.session import KedroSession

VARIANTS = ("wdl", "wdl_apg", "wdl_apg_group_user")


def _keep_variants(root: Path) -> None:
    path = root / "conf/base/parameters_apg.yml"
    config = yaml.safe_load(path.read_text())
    config["apg"]["variants"] = {k: v for k, v in config["apg"]["variants"].items() if k in VARIANTS}
    report = config["apg"]["report"]  # the plan refuses report rows that name no variant
    report["paper_rows"] = [r for r in report["paper_rows"] if {r["variant"], r["base"]} <= set(VARIANTS)]
    report["frequency_plot_variants"] = [v for v in report["frequency_plot_variants"] if v in VARIANTS]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _latest(root: Path, relative: str) -> Path:
    versions = sorted(p for p in (root / relative).iterdir() if p.is_dir())
    return versions[-1] / Path(relative).name


def _run(root: Path, **kwargs) -> None:
    with KedroSession.create(project_path=root, env="tiny") as session:
        session.run(**kwargs)


def test_train_fold_report_and_score(project: Path) -> None:
    _keep_variants(project)
    _run(project, pipeline_names=["apg"])

    report = project / "data/08_reporting/tiny/apg"
    summary = json.loads(_latest(project, "data/08_reporting/tiny/apg/summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == list(VARIANTS)
    for v in summary["variants"]:
        for key in ("test_auc", "test_logloss", "test_gauc_user", "test_gauc_domain"):
            assert math.isfinite(v[key]) and v[key] > 0, (v["name"], key)
        assert 0.5 < v["test_auc"] < 1
        assert v["folding_check"]["passed"] and v["folding_check"]["max_abs_diff"] <= 1e-5
        assert v["parameter_count"] > 0 and v["seeds"] == 2
    by_name = {v["name"]: v for v in summary["variants"]}
    assert by_name["wdl"]["model_family"] == "base" and by_name["wdl"]["condition"] is None
    assert by_name["wdl_apg"]["condition"] == "self" and by_name["wdl_apg"]["apg_version"] == "v5"
    assert by_name["wdl_apg_group_user"]["condition"] == "group(user)"
    # over-parameterised factors are multiplied out: fewer parameters once folded
    assert by_name["wdl_apg"]["folded_parameter_count"] < by_name["wdl_apg"]["parameter_count"]

    comparison = {(r["paper_table"], r["paper_row"]): r for r in summary["comparison"]}
    self_wise = comparison[("Table 4", "Self-wise, z = x_i")]
    assert self_wise["seeds"] == 2 and math.isfinite(self_wise["our_delta_pct"])
    assert self_wise["ci95_low_pct"] <= self_wise["our_delta_pct"] <= self_wise["ci95_high_pct"]
    assert 0 <= self_wise["t_test_p"] <= 1 and len(self_wise["delong_p_per_seed"].split()) == 2
    assert self_wise["verdict"] in ("significant gain", "no significant difference", "significant loss")
    assert self_wise["equal_budget"] is True
    assert ("Table 5", "v1: W_i x_i") not in comparison  # its variant was not kept
    assert by_name["wdl_apg"]["vs_base"]["seeds"] == 2 and by_name["wdl"]["vs_base"] is None
    budgets = {n: by_name[n]["budget"] for n in VARIANTS}
    assert budgets["wdl_apg"]["n_trials"] == budgets["wdl"]["n_trials"] + 1  # one own dimension (K)
    assert budgets["wdl_apg"]["common_dimensions"] == budgets["wdl"]["common_dimensions"]

    html = _latest(project, "data/08_reporting/tiny/apg/report.html").read_text()
    assert html.count("<img") == 5 and "Paper delta vs our delta" in html and "Hyper-parameter studies" in html
    assert "Gain per domain-size bin" in html and "AdaSparse" not in html  # no AdaSparse variant here
    for figure in ("frequency_gain.png", "cores_pca.png"):
        assert _latest(project, f"data/08_reporting/tiny/apg/{figure}").stat().st_size > 1000
    projection = pd.read_parquet(_latest(project, "data/08_reporting/tiny/wdl_apg/cores_projection.parquet"))
    assert len(projection) == 300 and projection[["pc1", "pc2"]].notna().all().all()
    assert pd.read_parquet(_latest(project, "data/08_reporting/tiny/wdl/cores_projection.parquet")).empty
    for variant in VARIANTS:
        bundle = _latest(project, f"data/06_models/tiny/{variant}/folded_model")
        assert sorted(p.name for p in bundle.iterdir()) == ["seed_2024", "seed_2025"]
        assert (bundle / "seed_2024/model.safetensors").is_file() and (bundle / "seed_2024/config.json").is_file()
        assert json.loads((bundle / "seed_2024/config.json").read_text())["model"]["folded"] is True
    assert (report / "efficiency_table.parquet").is_dir()

    # scoring: the shipped tiny ratings through the same adapter and the deployed model
    _run(project, pipeline_names=["scoring_suite"])
    predictions = pd.read_parquet(_latest(project, "data/07_model_output/tiny/scoring_predictions.parquet"))
    scoring = json.loads(_latest(project, "data/08_reporting/tiny/scoring_report.json").read_text())
    ratings = pd.read_csv(project / "data/01_raw/ml-latest-tiny/ratings.csv")
    assert len(predictions) == len(ratings) == scoring["rows_scored"] + scoring["rows_not_scored"]
    assert predictions["probability"].between(0, 1).all()
    assert list(predictions.columns) == ["user", "item", "timestamp", "source_line", "probability"]


def test_second_run_resumes_the_studies_and_reproduces_the_metrics(project: Path) -> None:
    _keep_variants(project)
    _run(project, pipeline_names=["apg"])
    first = json.loads(_latest(project, "data/08_reporting/tiny/apg/summary.json").read_text())
    _run(project, pipeline_names=["apg"])
    second = json.loads(_latest(project, "data/08_reporting/tiny/apg/summary.json").read_text())
    for a, b in zip(first["variants"], second["variants"]):
        assert a["test_auc"] == b["test_auc"], a["name"]
    tuning = json.loads(_latest(project, "data/06_models/tiny/wdl_apg/tuning_summary.json").read_text())
    assert tuning["status"] == "trained" and tuning["budget"]["finished_trials"] == tuning["budget"]["n_trials"]
    # The study was complete in storage: nothing re-tuned, the best model was rebuilt.
    assert tuning["retrained_best"] is True
    assert len(list((project / "data/08_reporting/tiny/apg/summary.json").iterdir())) == 2


def test_the_training_node_trains_data_parallel(project: Path, project_maker, tmp_path: Path, monkeypatch) -> None:
    """``--params training.data_parallel.ranks=2``: the training node trains every trial
    and seed on two gloo ranks, and folding, scoring and the report take its models as
    they take a single process's. With the base config (one trial, no dropout) the two
    runs agree to float32 summation order (tests/training/test_distributed.py)."""
    make_project, _ = project_maker
    single = make_project(tmp_path / "single", monkeypatch)
    summaries = {}
    for root, ranks in ((single, 1), (project, 2)):
        monkeypatch.chdir(root)  # the catalog's paths are relative
        _keep_variants(root)
        params = {"training": {"limits": {"n_trials": 1}, "data_parallel": {"ranks": ranks}}}
        with KedroSession.create(project_path=root, env="tiny", runtime_params=params) as session:
            session.run(pipeline_names=["apg"])
        summaries[ranks] = json.loads(_latest(root, "data/08_reporting/tiny/apg/summary.json").read_text())
    for name in VARIANTS:
        tuning = json.loads(_latest(project, f"data/06_models/tiny/{name}/tuning_summary.json").read_text())
        assert tuning["data_parallel"] == {"ranks": 2, "reason": None}, name
    for one, two in zip(summaries[1]["variants"], summaries[2]["variants"], strict=True):
        assert one["name"] == two["name"] and two["folding_check"]["passed"]
        assert two["test_auc"] == pytest.approx(one["test_auc"], abs=1e-3), one["name"]
        assert two["test_logloss"] == pytest.approx(one["test_logloss"], abs=1e-3), one["name"]
