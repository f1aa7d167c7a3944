"""Every environment the README documents runs its whole pipeline, on a smoke budget.

One trial, one epoch, one seed and the first rows of the training split per variant
(``training.limits``): the point is that each data set's documented command runs end to
end (plan, train, fold, evaluate, report), not the numbers. MovieLens-100K and the
Criteo and Avazu samples come from the data root; MovieLens-1M, GroupLens' ML-100K
layout and IJCAI-18 are written by the tests from real ML-100K rows (``formats``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from formats import write_grouplens_100k, write_ijcai18, write_ml1m
from kedro.framework.session import KedroSession

from dynamic_ctr.pipelines.suite import DEFAULT_SUITES, SUITES, suite_variant_names

PROJECT = Path(__file__).resolve().parents[2]
SMOKE = {
    "training": {"limits": {"n_trials": 1, "max_epochs": 1, "seeds": 1, "train_rows": 3000}},
    "folding": {"latency_repeats": 2},
}
ML100K = "movielens-100k"

# env -> how its raw files are found: "shipped", "data_root", or a writer(typed ML-100K dir, root)
WRITERS: dict[str, Callable[[Path, Path], object]] = {
    "ml100k_grouplens": lambda typed, root: write_grouplens_100k(typed, root / "ml-100k"),
    "ml1m": lambda typed, root: write_ml1m(typed, root / "ml-1m"),
    "ijcai18": lambda typed, root: write_ijcai18(typed, root / "ijcai18" / "round1_ijcai_18_train_20180301.txt"),
}
SHIPPED = ("local", "tiny", "paper")
FROM_DATA_ROOT = ("ml100k", "criteo", "avazu")


def _dataset_folder(env: str) -> str:
    globals_file = PROJECT / "conf" / env / "globals.yml"
    if env != "local" and globals_file.is_file():
        return yaml.safe_load(globals_file.read_text())["dataset"]
    return yaml.safe_load((PROJECT / "conf/base/globals.yml").read_text())["dataset"]


def _declared_not_applicable(env: str, suite: str, variant_set: str = "default") -> set[str]:
    """Variants the env declares not applicable, and (default set) those marked full_only."""
    path = PROJECT / "conf" / env / "parameters.yml"
    params = yaml.safe_load(path.read_text()) if path.is_file() else {}
    declared = set(((params or {}).get(suite) or {}).get("not_applicable") or {})
    if variant_set == "full":
        return declared
    base = yaml.safe_load((PROJECT / "conf/base" / f"parameters_{suite}.yml").read_text())[suite]["variants"]
    return declared | {n for n, v in base.items() if (v or {}).get("full_only")}


def _latest(root: Path, relative: str) -> Path:
    versions = sorted(p for p in (root / relative).iterdir() if p.is_dir())
    return versions[-1] / Path(relative).name


def test_every_documented_environment_is_covered() -> None:
    """A new environment folder must be added here (and to the README's table)."""
    # spark: ingestion and features only, on Spark (tests/pipelines/test_spark.py; skipped without pyspark)
    envs = {p.name for p in (PROJECT / "conf").iterdir() if p.is_dir() and p.name not in ("base", "local", "spark")}
    assert envs == {*SHIPPED, *FROM_DATA_ROOT, *WRITERS} - {"local"}


@pytest.mark.slow
@pytest.mark.parametrize("env", [*SHIPPED, *FROM_DATA_ROOT, *WRITERS])
def test_environment_runs_end_to_end(env: str, project: Path, request: pytest.FixtureRequest, monkeypatch, tmp_path, caplog) -> None:
    if env in SHIPPED:
        shutil.copytree(PROJECT / "data/01_raw/ml-latest-small", project / "data/01_raw/ml-latest-small")
    else:
        data_root = request.getfixturevalue("data_root")
        if env in WRITERS:
            root = tmp_path / "written"
            WRITERS[env](data_root / ML100K, root)
            data_root = root
        monkeypatch.setenv("DYNAMIC_CTR_DATA_ROOT", str(data_root))
    # `kedro run --env <env>` (the default env is `local`); there, each suite's pipeline by
    # name; Avazu through the streaming data pipeline (`--pipeline stream_<suite>`), whose
    # data equal the in-memory pipelines' (tests/pipelines/test_streaming.py)
    pipelines = list(SUITES) if env == "local" else [f"stream_{s}" for s in SUITES] if env == "avazu" else None
    with KedroSession.create(project_path=project, env=env, runtime_params=SMOKE) as session:
        session.run(pipeline_names=pipelines)
    assert set(DEFAULT_SUITES) == set(SUITES)  # every suite runs on every data set today
    for suite in SUITES:
        _check_suite_report(project, env, suite)
    if env in ("criteo", "avazu"):  # a lazily loaded training split that fits: read into memory
        decisions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training split read")]
        assert decisions and all(m.startswith("training split read into memory") for m in decisions)


def _check_suite_report(project: Path, env: str, suite: str, variant_set: str = "default") -> None:
    folder = f"data/08_reporting/{_dataset_folder(env)}/{suite}"
    summary = json.loads(_latest(project, f"{folder}/summary.json").read_text())
    trained = {v["name"] for v in summary["variants"]}
    skipped = {v["name"] for v in summary["not_applicable"]}
    assert skipped == _declared_not_applicable(env, suite, variant_set)
    assert trained | skipped == set(suite_variant_names(suite, PROJECT)) and not trained & skipped
    for v in summary["variants"]:
        assert 0 < v["test_auc"] < 1 and math.isfinite(v["test_logloss"]), (env, v["name"])
        assert v["folding_check"]["passed"] and v["seeds"] == 1, (env, v["name"])
        assert v["budget"]["n_trials"] == 1 and v["budget"]["max_epochs"] == 1
    for row in summary["comparison"]:
        if row["variant"] in skipped or row["base"] in skipped:
            assert row["verdict"].startswith("not applicable: "), row
        else:
            assert row["verdict"] == "not enough seeds" and row["seeds"] == 1, row
    assert summary["deployment"]["variant"] in trained
    assert summary["tables"], (env, suite)
    for row in summary["tables"]:  # one seed: a mean, no interval
        if row["variant"] in skipped:
            assert row["status"].startswith("not applicable: ") and row["auc_mean"] is None, row
        else:
            assert row["status"] == "trained" and 0 < row["auc_mean"] < 1 and row["auc_ci95_low"] is None, row
    assert {r["variant"] for r in summary["parameters_by_grain"]} == trained
    if suite == "multidomain":  # every AdaSparse variant's learned structure is on record
        assert set(summary["adasparse"]) == {n for n in trained if "adasparse" in n}
        assert all(len(r["sparsity_by_layer"]) == 3 for r in summary["adasparse"].values())
    report = _latest(project, f"{folder}/report.html").read_text()
    assert "Not run here" in report and "Models on the same split" in report
    for name in skipped:
        assert name in report


@pytest.mark.slow
def test_the_full_set_trains_every_variant(project: Path) -> None:
    """`kedro run --params training.variant_set=full` on the tiny data: the variants left
    out of the default run (full_only) train, fold and report like the others."""
    with KedroSession.create(project_path=project, env="tiny", runtime_params={**SMOKE, "training": {**SMOKE["training"], "variant_set": "full"}}) as session:
        session.run(pipeline_names=["apg", "dynint", "multidomain"])
    for suite in ("apg", "dynint", "multidomain"):
        _check_suite_report(project, "tiny", suite, "full")


@pytest.mark.slow
def test_a_variant_the_data_cannot_run_stops_the_run_before_any_training(project: Path, data_root: Path, monkeypatch) -> None:
    """`kedro run --env criteo` without its not_applicable declarations: the APG plan names
    the three user/item-conditioned variants in one error, and no variant has trained."""
    params = project / "conf/criteo/parameters.yml"
    config = yaml.safe_load(params.read_text())
    del config["apg"]
    params.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DYNAMIC_CTR_DATA_ROOT", str(data_root))
    with pytest.raises(Exception, match="3 problem") as caught:
        with KedroSession.create(project_path=project, env="criteo", runtime_params=SMOKE) as session:
            session.run()
    for name in ("wdl_apg_group_user", "wdl_apg_group_item", "wdl_apg_mix"):
        assert f"- {name}: lacks the field role" in str(caught.value)
    assert not list((project / "data/06_models").glob("criteo/*/trained_model"))
    assert (project / "data/05_model_input/criteo/feature_spec.json").is_dir()  # the data pipelines ran
