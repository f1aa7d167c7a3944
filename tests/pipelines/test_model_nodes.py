"""Node-level tests of training, folding and reporting on real (tiny) encoded data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamic_ctr.data.adapters import movielens_latest
from dynamic_ctr.data.encoder import EncoderParams, FeatureEncoder, aggregate_item_lists
from dynamic_ctr.data.raw import RawFileConfig, read_raw
from dynamic_ctr.data.split import SplitParams, split_frame
from dynamic_ctr.models import build_model
from dynamic_ctr.pipelines.folding import nodes as folding
from dynamic_ctr.pipelines.reporting.nodes import _delta, _verdict, evaluate_variant
from dynamic_ctr.pipelines.training.nodes import base_config, variant_settings


PROJECT = Path(__file__).resolve().parents[2]
FOLDING = {"tolerance": 1e-5, "latency_batch": 64, "latency_repeats": 2}


@pytest.fixture(scope="module")
def tiny():
    root = PROJECT / "data/01_raw/ml-latest-tiny"
    files = {k: read_raw(RawFileConfig(filepath=str(root / f"{k}.csv"))) for k in ("ratings", "movies", "tags")}
    result = movielens_latest(files, {})
    train, valid, test = split_frame(result.table, SplitParams(), result.schema.time_key)
    train, (valid, test), _ = aggregate_item_lists(train, [valid, test], result.schema)
    encoder = FeatureEncoder.fit(train, result.schema, EncoderParams())
    test_frame, _ = encoder.transform(test)
    test_frame["frequency_group"] = np.arange(len(test_frame)) % 10
    return encoder.feature_spec(), test_frame


def _v5(spec):
    config = {"family": "wdl", "hidden_units": [32, 16], "dropout": 0.2,
              "apg": {"version": "v5", "rank": 4, "width": 8, "condition": {"mode": "self"}}}
    return build_model(config, spec)


def test_fold_variant_checks_and_records(tiny) -> None:
    spec, test = tiny
    folded, check = folding.fold_variant({"seed_1": _v5(spec)}, test, spec.to_dict(), FOLDING)
    assert check["max_abs_diff"] <= 1e-5 and check["test_rows"] == len(test)
    assert check["folded_parameters"] < check["parameters"]
    assert check["latency_ms"] > 0 and check["folded_latency_ms"] > 0
    assert not folded["seed_1"].training


def test_fold_variant_refuses_a_folded_model_that_predicts_differently(tiny, monkeypatch) -> None:
    spec, test = tiny

    real_fold = folding.fold_model

    def broken_fold(model):
        folded = real_fold(model)
        with torch.no_grad():
            next(p for n, p in folded.named_parameters() if "bias" in n).add_(0.5)
        return folded

    monkeypatch.setattr(folding, "fold_model", broken_fold)
    with pytest.raises(folding.FoldingMismatchError, match=r"seed_1: folded and trained predictions differ"):
        folding.fold_variant({"seed_1": _v5(spec)}, test, spec.to_dict(), FOLDING)


def test_select_deployment_by_validation_auc_or_by_name() -> None:
    artifacts = {
        "a__folded": {"seed_1": "model-a"}, "a__summary": {"best_value": 0.70},
        "b__folded": {"seed_1": "model-b"}, "b__summary": {"best_value": 0.75},
    }
    bundle, record = folding.select_deployment({"variant": "best"}, **artifacts)
    assert bundle == {"model": "model-b"} and record["variant"] == "b"
    bundle, record = folding.select_deployment({"variant": "a"}, **artifacts)
    assert bundle == {"model": "model-a"} and record["selected_by"] == "parameter"
    with pytest.raises(ValueError, match="deployment.variant='c'"):
        folding.select_deployment({"variant": "c"}, **artifacts)


def test_evaluate_variant_metrics_and_projection(tiny) -> None:
    spec, test = tiny
    model = _v5(spec).eval()
    metrics, projection = evaluate_variant({"seed_1": model, "seed_2": _v5(spec).eval()}, test, spec.to_dict(), {"pca_rows": 100})
    assert set(metrics["seeds"]) == {"seed_1", "seed_2"}
    assert metrics["auc"]["n"] == 2 and 0 < metrics["auc"]["mean"] < 1
    assert set(metrics["seeds"]["seed_1"]["by_frequency_group"]) <= {str(g) for g in range(10)}
    assert len(projection) == 100 and set(projection.columns) == {"pc1", "pc2", "frequency_group", "domain"}
    base = build_model({"family": "wdl", "hidden_units": [32, 16]}, spec).eval()
    _, empty = evaluate_variant({"seed_1": base}, test, spec.to_dict(), {"pca_rows": 100})
    assert empty.empty


def test_delta_pairs_seeds_and_verdicts() -> None:
    variant = {"seeds": {"s1": {"auc": 0.80}, "s2": {"auc": 0.82}}}
    base = {"seeds": {"s1": {"auc": 0.79}, "s2": {"auc": 0.80}}}
    mean, std, n = _delta(variant, base)
    assert n == 2 and mean == pytest.approx(0.015) and std == pytest.approx(np.std([0.01, 0.02], ddof=1))
    assert _verdict(mean, std, paper=0.39).startswith("reproduces")
    assert _verdict(-0.01, 0.001, paper=0.39).startswith("does not reproduce (loss")
    assert _verdict(0.001, 0.01, paper=0.39) == "does not reproduce (within noise)"
    assert _verdict(0.01, math.nan, paper=0.39) == "one seed: no verdict"


def test_variant_settings_overrides_and_base_config_uses_the_first_seed() -> None:
    training = {"seeds": [7, 8], "study": {"n_trials": 2}, "train": {"lr": 0.005, "seed": 1},
                "search_space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}}}
    variant = {"model": {"family": "wdl"}, "train": {"lr": 0.001}, "study": {"n_trials": 1}}
    settings = variant_settings(training, variant)
    assert settings["study"] == {"n_trials": 1} and "train.lr" in settings["search_space"]
    assert base_config(settings, variant) == {"model": {"family": "wdl"}, "train": {"lr": 0.001, "seed": 7}}
    with pytest.raises(ValueError, match="unknown key"):
        variant_settings(training, {"model": {}, "modle": {}})
    with pytest.raises(ValueError, match="'model'"):
        variant_settings(training, {"seeds": [1]})
    # a variant may run fewer seeds (an expensive one, say)
    settings = variant_settings(training, {"model": {}, "seeds": [9]})
    assert settings["seeds"] == [9] and base_config(settings, {"model": {}})["train"]["seed"] == 9
