from __future__ import annotations

import json
import math

import optuna
import torch
import pytest

from dynamic_ctr.training import auc, evaluate
from dynamic_ctr.training.tuning import (
    StudyConfig,
    apply_overrides,
    base_params,
    decode_params,
    run_study,
    suggest,
    trials_table,
    tune,
    validate_space,
)

BASE = {
    "model": {"dim": 4, "hidden": 8, "dropout": 0.0, "block": {"rank": 2}},
    "train": {
        "lr": 0.02,
        "batch_size": 256,
        "max_epochs": 3,
        "patience": 2,
        "progress": False,
        "log_every": 5,
    },
}

SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "model.block.rank": {"type": "int", "low": 1, "high": 8},
    "model.hidden": {"type": "categorical", "choices": [4, 8, 16]},
}


def _analytic_objective(trial: optuna.Trial) -> float:
    p = suggest(trial, SPACE)
    return (
        -((math.log10(p["train.lr"]) + 2) ** 2)
        - abs(p["model.block.rank"] - 5) / 10
        + p["model.hidden"] / 100
    )


def _sqlite(tmp_path, *parts: str) -> str:
    return f"sqlite:///{tmp_path.joinpath(*parts)}"


# ------------------------------------------------------------ overrides / space


def test_apply_overrides_sets_dotted_paths_on_a_deep_copy():
    out = apply_overrides(BASE, {"model.block.rank": 8, "train.lr": 0.1, "model.hidden": [32, 16]})
    assert (
        out["model"]["block"]["rank"] == 8
        and out["train"]["lr"] == 0.1
        and out["model"]["hidden"] == [32, 16]
    )
    assert BASE["model"]["block"]["rank"] == 2 and BASE["train"]["lr"] == 0.02  # base untouched
    out["model"]["block"]["rank"] = 99
    assert BASE["model"]["block"]["rank"] == 2  # no shared nested dicts


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("model.block.rnk", r"'model\.block\.rnk'.*'rnk' under model\.block"),
        ("model.dim.x", r"'model\.dim\.x'"),  # descending into a scalar
        ("lr", r"'lr'.*did you mean train\.lr\?"),  # no shorthand, but a hint
        ("optimizer.lr", r"'optimizer\.lr'"),
    ],
)
def test_apply_overrides_unknown_path_names_it(path, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(BASE, {path: 1})


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"train.lr": {"type": "float", "low": 1.0, "high": 0.1}}, "train.lr"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log scale"),
        ({"model.hidden": {"type": "categorical", "choices": []}}, "model.hidden"),
        ({"model.hidden": {"type": "uniform", "low": 0, "high": 1}}, "type='uniform'"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 1.0, "lg": True}}, "'lg'"),
        ({}, "empty"),
    ],
)
def test_validate_space_names_the_bad_entry(space, match):
    with pytest.raises(ValueError, match=match):
        validate_space(space)


def test_base_params_keeps_only_base_values_inside_the_space():
    space = {**SPACE, "model.dropout": {"type": "float", "low": 0.1, "high": 0.5}}
    # lr 0.02 in range, rank 2 in range, hidden 8 a choice, dropout 0.0 outside [0.1, 0.5]
    assert base_params(BASE, space) == {"train.lr": 0.02, "model.block.rank": 2, "model.hidden": 8}


def test_suggest_decodes_non_scalar_categorical_choices():
    space = {"model.hidden": {"type": "categorical", "choices": [[16, 8], [32, 16]]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(8):
        trial = study.ask()
        value = suggest(trial, space)["model.hidden"]
        assert value in ([16, 8], [32, 16])
        assert decode_params(trial.params, space) == {"model.hidden": value}
        drawn.add(tuple(value))
        study.tell(trial, 0.0)
    assert len(drawn) == 2


# ------------------------------------------------------------ run_study


def test_seeded_tpe_suggests_the_same_params_in_fresh_studies():
    cfg = StudyConfig(study_name="s", n_trials=10, n_startup_trials=3, seed=123)
    a = run_study(_analytic_objective, cfg)
    b = run_study(_analytic_objective, cfg)
    c = run_study(
        _analytic_objective, StudyConfig(study_name="s", n_trials=10, n_startup_trials=3, seed=124)
    )
    params = [t.params for t in a.trials]
    assert len(params) == 10  # 3 random start-up trials, then 7 TPE ones
    assert params == [t.params for t in b.trials]
    assert params != [t.params for t in c.trials]


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_sqlite_study_resumes_to_exactly_n_trials(tmp_path):
    storage = _sqlite(tmp_path, "nested", "dir", "optuna.db")  # parent dirs do not exist yet
    cfg = StudyConfig(study_name="resume", storage=storage, n_trials=6, n_startup_trials=2, seed=0)

    def interrupted_at_3(trial: optuna.Trial) -> float:
        if trial.number == 3:
            raise _Interrupt
        return _analytic_objective(trial)

    with pytest.raises(_Interrupt):
        run_study(interrupted_at_3, cfg)
    assert (tmp_path / "nested" / "dir" / "optuna.db").is_file()
    before = trials_table(optuna.load_study(study_name="resume", storage=storage))
    assert [r["state"] for r in before] == ["COMPLETE"] * 3 + ["FAIL"]

    study = run_study(_analytic_objective, cfg)
    rows = trials_table(study)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == cfg.n_trials  # not 3 + 6
    assert len(rows) == cfg.n_trials + 1  # plus the interrupted (FAIL) one
    for old, new in zip(before[:3], rows[:3], strict=True):  # earlier trials kept as they were
        assert (old["number"], old["params"], old["value"]) == (
            new["number"],
            new["params"],
            new["value"],
        )

    again = run_study(_analytic_objective, cfg)  # already complete: runs nothing
    assert len(again.trials) == len(rows)


def test_run_study_silences_optuna_info_logs_and_restores_verbosity(capfd):
    previous = optuna.logging.get_verbosity()
    run_study(_analytic_objective, StudyConfig(study_name="quiet", n_trials=2))
    assert "Trial 0 finished" not in capfd.readouterr().err
    assert optuna.logging.get_verbosity() == previous


def test_trials_table_is_json_able():
    study = run_study(_analytic_objective, StudyConfig(study_name="t", n_trials=3))
    rows = json.loads(json.dumps(trials_table(study), allow_nan=False))
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {
        "number",
        "state",
        "value",
        "params",
        "duration_s",
        "datetime_start",
        "user_attrs",
    }
    assert rows[0]["params"].keys() == SPACE.keys() and rows[0]["duration_s"] >= 0


# ------------------------------------------------------------ tune


LR_SPACE = {"train.lr": {"type": "categorical", "choices": [0.05, 0.03, 1e-7]}}


def _enqueued_study(storage: str, name: str, lrs: list[float]) -> None:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    for lr in lrs:
        study.enqueue_trial({"train.lr": lr})


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_median_pruner_prunes_a_clearly_bad_trial(tmp_path, splits, spec, builder, pruner):
    # trials 0 and 1 learn (lr 0.05, 0.03); trial 2 practically does not (lr 1e-7),
    # so its epoch-1 AUC is far below the median of the first two
    train_data, valid_data, _ = splits
    storage = _sqlite(tmp_path, "optuna.db")
    _enqueued_study(storage, "prune", [0.05, 0.03, 1e-7])
    cfg = StudyConfig(
        study_name="prune", storage=storage, n_trials=3, n_startup_trials=2, pruner=pruner
    )
    result = tune(BASE, LR_SPACE, spec, train_data, valid_data, cfg, builder)

    trials = result.study.trials
    assert [t.params["train.lr"] for t in trials] == [0.05, 0.03, 1e-7]
    good_epoch1 = [t.intermediate_values[1] for t in trials[:2]]
    bad_epoch1 = trials[2].intermediate_values[1]
    assert min(good_epoch1) > bad_epoch1 + 0.1  # the scenario is as constructed
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]
    if pruner == "median":
        assert trials[2].state == optuna.trial.TrialState.PRUNED
        assert list(trials[2].intermediate_values) == [1]  # stopped right after epoch 1
    else:
        assert trials[2].state == optuna.trial.TrialState.COMPLETE
        assert len(trials[2].intermediate_values) > 1
    assert result.best_params["train.lr"] in (0.05, 0.03)


def test_tune_keeps_the_best_model_in_memory_and_rebuilds_it_on_resume(
    tmp_path, splits, spec, builder
):
    train_data, valid_data, _ = splits
    space = {
        "train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
        "model.hidden": {"type": "categorical", "choices": [[4], [8]]},  # list choices round-trip
    }
    base = {**BASE, "model": {**BASE["model"], "hidden": [8]}}

    def build(config, s):  # the stand-in takes an int width
        return builder({**config, "hidden": config["hidden"][0]}, s)

    cfg = StudyConfig(
        study_name="tune", storage=_sqlite(tmp_path, "optuna.db"), n_trials=3, n_startup_trials=2
    )
    first = tune(base, space, spec, train_data, valid_data, cfg, build)
    assert not first.retrained
    # the first trial of a new study runs the configured defaults
    assert decode_params(first.study.trials[0].params, space) == {
        "train.lr": base["train"]["lr"], "model.hidden": [8]
    }
    assert first.best_value == max(t.value for t in first.study.trials)
    assert first.best_config == apply_overrides(base, first.best_params)
    assert first.best_params["model.hidden"] in ([4], [8])
    assert not first.best_model.training
    best_trial = first.study.best_trial
    assert best_trial.user_attrs["history"] == first.best_history
    assert best_trial.user_attrs["overrides"] == first.best_params
    # the model handed back is the best trial's best epoch, not the last trial's
    assert auc(valid_data.y, evaluate(first.best_model, valid_data)) == pytest.approx(
        first.best_value, abs=1e-12
    )

    # same study, "new process": nothing left to run, so the best model is retrained
    second = tune(base, space, spec, train_data, valid_data, cfg, build)
    assert second.retrained and len(second.study.trials) == 3
    assert second.best_params == first.best_params
    assert auc(valid_data.y, evaluate(second.best_model, valid_data)) == pytest.approx(
        first.best_value, abs=1e-12
    )


def test_tune_rejects_unknown_paths_before_running_any_trial(splits, spec, builder):
    train_data, valid_data, _ = splits
    calls = []

    def counting_builder(config, s):
        calls.append(config)
        return builder(config, s)

    with pytest.raises(ValueError, match="'model.widht'"):
        tune(
            BASE,
            {"model.widht": {"type": "int", "low": 2, "high": 4}},
            spec,
            train_data,
            valid_data,
            StudyConfig(study_name="bad", n_trials=2),
            counting_builder,
        )
    assert calls == []


def test_tune_records_a_diverging_trial_as_failed_and_continues(splits, spec, builder):
    train_data, valid_data, _ = splits
    space = {"train.lr": {"type": "categorical", "choices": [1e30, 0.05]}}
    cfg = StudyConfig(study_name="div", n_trials=4, n_startup_trials=4, pruner="none", seed=1)
    result = tune(BASE, space, spec, train_data, valid_data, cfg, builder)
    states = {(t.params["train.lr"], t.state.name) for t in result.study.trials}
    assert states == {(1e30, "FAIL"), (0.05, "COMPLETE")}  # both drawn; only the sane one completes
    assert result.best_params == {"train.lr": 0.05}


# ------------------------------------------------------------ seeds


def test_each_seed_changes_the_initial_weights_and_the_same_seed_repeats_them(splits, spec):
    """``fit`` seeds the model's initialisation from the training seed (the model
    config's own ``seed`` is overridden), so seeds differ in their starting weights."""
    from dynamic_ctr.models import build_model
    from dynamic_ctr.training.tuning import fit

    initial: list[dict] = []

    def recording_builder(config, spec):
        model = build_model(config, spec)
        initial.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    train_data, valid_data, _ = splits
    config = {
        "model": {"family": "wdl", "embedding_dim": 4, "hidden_units": [8], "seed": 0},
        "train": {**BASE["train"], "max_epochs": 1, "seed": 0},
    }
    results = [
        fit(apply_overrides(config, {"train.seed": seed}), spec, train_data, valid_data, recording_builder)
        for seed in (1, 2, 1)
    ]
    first, second, again = initial
    assert any(not torch.equal(first[k], second[k]) for k in first)  # seed 2 starts elsewhere
    assert all(torch.equal(first[k], again[k]) for k in first)  # seed 1 starts at the same weights
    assert results[0].history[0]["val_auc"] == results[2].history[0]["val_auc"]
    assert results[0].history[0]["val_auc"] != results[1].history[0]["val_auc"]
    assert results[0].model.config["seed"] == 1 and results[1].model.config["seed"] == 2
