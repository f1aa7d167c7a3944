"""Node-level tests of training, folding and reporting on real (tiny) encoded data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dynamic_ctr.models import build_model
from dynamic_ctr.pipelines.folding import nodes as folding
from dynamic_ctr.pipelines.reporting.nodes import compare_pair, evaluate_variant


PROJECT = Path(__file__).resolve().parents[2]
FOLDING = {"tolerance": 1e-5, "latency_batch": 64, "latency_repeats": 2}


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


def test_select_deployment_by_validation_auc_or_by_name_among_trained_variants() -> None:
    artifacts = {
        "a__folded": {"seed_1": "model-a"}, "a__summary": {"status": "trained", "best_value": 0.70},
        "b__folded": {"seed_1": "model-b"}, "b__summary": {"status": "trained", "best_value": 0.75},
        "c__folded": {}, "c__summary": {"status": "not_applicable", "reason": "no user field"},
    }
    bundle, record = folding.select_deployment({"apg": "best"}, suite="apg", **artifacts)
    assert bundle == {"model": "model-b"} and record["variant"] == "b" and record["suite"] == "apg"
    bundle, record = folding.select_deployment({}, suite="apg", **artifacts)  # best by default
    assert record["variant"] == "b"
    bundle, record = folding.select_deployment({"apg": "a"}, suite="apg", **artifacts)
    assert bundle == {"model": "model-a"} and record["selected_by"] == "parameter"
    with pytest.raises(ValueError, match="deployment.apg='c' is not a trained variant"):
        folding.select_deployment({"apg": "c"}, suite="apg", **artifacts)


def test_fold_variant_passes_a_not_applicable_variant_through(tiny) -> None:
    spec, test = tiny
    assert folding.fold_variant({}, test, spec.to_dict(), FOLDING) == ({}, {"status": "not_applicable"})


def test_evaluate_variant_metrics_and_projection(tiny) -> None:
    spec, test = tiny
    model = _v5(spec).eval()
    metrics, predictions, projection = evaluate_variant(
        {"seed_1": model, "seed_2": _v5(spec).eval()}, test, spec.to_dict(), {"pca_rows": 100}
    )
    assert set(metrics["seeds"]) == {"seed_1", "seed_2"}
    assert metrics["auc"]["n"] == 2 and 0 < metrics["auc"]["mean"] < 1
    assert set(metrics["seeds"]["seed_1"]["by_frequency_group"]) <= {str(g) for g in range(10)}
    assert len(projection) == 100 and set(projection.columns) == {"pc1", "pc2", "frequency_group", "domain"}
    # predictions: one column per seed, in test-row order, matching the recorded AUCs
    assert list(predictions.columns) == ["label", "seed_1", "seed_2"] and len(predictions) == len(test)
    for seed in ("seed_1", "seed_2"):
        assert roc_auc_score(predictions["label"], predictions[seed]) == pytest.approx(metrics["seeds"][seed]["auc"], abs=1e-12)
    base = build_model({"family": "wdl", "hidden_units": [32, 16]}, spec).eval()
    _, _, empty = evaluate_variant({"seed_1": base}, test, spec.to_dict(), {"pca_rows": 100})
    assert empty.empty
    status, none, _ = evaluate_variant({}, test, spec.to_dict(), {"pca_rows": 100})
    assert status == {"status": "not_applicable"} and none.empty


def test_compare_pair_pairs_seeds_by_name_and_tests_them(tiny) -> None:
    spec, test = tiny
    rng = np.random.default_rng(0)
    y = test["label"].to_numpy()
    signal = y + rng.normal(0, 1.0, len(y))
    base = pd.DataFrame({"label": y, "seed_1": signal + rng.normal(0, 1.0, len(y)), "seed_2": signal + rng.normal(0, 1.0, len(y))})
    # the variant is the base's scores with much less noise: a clear gain on every seed
    better = pd.DataFrame({"label": y, "seed_2": signal + rng.normal(0, 0.1, len(y)), "seed_1": signal + rng.normal(0, 0.1, len(y)),
                           "seed_9": signal})
    result = compare_pair(better, base, alpha=0.05)
    assert result["seeds"] == 2  # seed_9 has no partner
    deltas = [roc_auc_score(y, better[s]) - roc_auc_score(y, base[s]) for s in ("seed_1", "seed_2")]
    assert result["delta"] == pytest.approx(np.mean(deltas), abs=1e-9)
    assert result["ci_low"] <= result["delta"] <= result["ci_high"]
    assert result["delong_significant"] == 2 and all(p < 1e-3 for p in result["delong_p"])
    one = compare_pair(better[["label", "seed_1"]], base, alpha=0.05)
    assert one["seeds"] == 1 and one["verdict"] == "not enough seeds" and one["t_test_p"] is None
    with pytest.raises(ValueError, match="same test rows"):
        compare_pair(better.assign(label=1 - y), base, alpha=0.05)


def test_study_and_spectrum_figures(tiny) -> None:
    """One panel per numeric searched value; one curve per PIN layer (none for APG)."""
    import json as _json

    from dynamic_ctr.pipelines.reporting.nodes import _hyperparameter_plot, _spectrum_plot

    spec, _ = tiny
    trials = pd.DataFrame({
        "state": ["COMPLETE", "COMPLETE", "PRUNED"],
        "value": [0.70, 0.72, 0.60],
        "params": [_json.dumps({"train.lr": 0.002, "model.dynint.layers": 2}),
                   _json.dumps({"train.lr": 0.005, "model.dynint.layers": 3}),
                   _json.dumps({"train.lr": 0.009, "model.dynint.layers": 1})],
    })
    fig = _hyperparameter_plot({"dynint_dgp": trials})
    panels = [ax for ax in fig.axes if ax.axison]
    assert sorted(ax.get_title() for ax in panels) == ["model.dynint.layers", "train.lr"]
    assert all(len(ax.collections[0].get_offsets()) == 2 for ax in panels)  # the pruned trial is left out
    dgp = build_model({"family": "xdeepint", "embedding_dim": 8, "dynint": {"mode": "dgp", "layers": 2, "rank": 3}}, spec)
    kernels = dgp.interaction_kernels()
    assert len(kernels) == 2 and torch.linalg.matrix_rank(kernels[0]) == 3  # U V^T has rank K
    fig = _spectrum_plot({"dynint_dgp": dgp, "wdl_apg": _v5(spec)})
    assert len(fig.axes[0].get_lines()) == 2


def test_model_tables_give_seed_means_with_t_intervals_and_the_papers_figures() -> None:
    from scipy import stats

    from dynamic_ctr.pipelines.reporting.nodes import model_tables

    aucs, loglosses = [0.71, 0.73, 0.74], [0.52, 0.50, 0.49]
    metrics = {
        "xdeepint": {"seeds": {f"seed_{i}": {"auc": a, "logloss": l, "gauc_domain": a - 0.01}
                               for i, (a, l) in enumerate(zip(aucs, loglosses))}},
        "fm": {"seeds": {"seed_0": {"auc": 0.70, "logloss": 0.55}}},
    }
    described = {"xdeepint": {"model_family": "base", "backbone": "xdeepint", "condition": None}}
    tables = [{"title": "T1", "variants": ["fm", "xdeepint", "ref_dnn"], "paper": {"xdeepint": {"auc": 0.8111}}},
              {"title": "all"}]
    frame = model_tables(tables, metrics, described, {"ref_dnn": "no such field"})
    t1 = frame[frame["table"] == "T1"].set_index("variant")
    assert list(t1.index) == ["fm", "xdeepint", "ref_dnn"]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(aucs), scale=stats.sem(aucs))
    row = t1.loc["xdeepint"]
    assert row["auc_mean"] == pytest.approx(np.mean(aucs)) and row["seeds"] == 3
    assert (row["auc_ci95_low"], row["auc_ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert row["logloss_ci95_low"] < np.mean(loglosses) < row["logloss_ci95_high"]
    assert row["gauc_domain_mean"] == pytest.approx(np.mean(aucs) - 0.01)  # over domains, where the data has them
    assert pd.isna(t1.loc["fm", "gauc_domain_mean"])
    assert row["paper_auc"] == 0.8111 and pd.isna(row["paper_logloss"]) and row["backbone"] == "xdeepint"
    assert pd.isna(t1.loc["fm", "auc_ci95_low"]) and t1.loc["fm", "auc_mean"] == 0.70  # one seed: no interval
    assert t1.loc["ref_dnn", "status"] == "not applicable: no such field" and t1.loc["ref_dnn", "seeds"] == 0
    assert list(frame[frame["table"] == "all"]["variant"]) == ["xdeepint", "fm"]  # no list: every trained variant


def _with_domains(spec, test):
    """The tiny split with a 4-domain field (from the hour), as the domains pipeline adds one."""
    from dynamic_ctr.spec import FieldSpec

    spec = spec.with_field(FieldSpec("domain", "categorical", vocab_size=6, source="domain"), domain_field="domain")
    return spec, test.assign(domain=(test["hour"].to_numpy() % 4 + 2).astype(np.int32))


def test_fold_variant_records_adasparse_sparsity_and_checks_each_domains_pruned_form(tiny) -> None:
    spec, test = _with_domains(*tiny)
    config = {"family": "dnn", "hidden_units": [32, 16], "seed": 3,
              "adasparse": {"formulation": "binarization", "pruner_input": "domain"}}
    model = build_model(config, spec)
    with torch.no_grad():  # as if trained: alpha annealed, factors exactly zero for some domains
        model.embedding.table.weight.normal_(0, 1.0)
        model.dense.alpha.fill_(5.0)
        for pruner in model.dense.pruners:
            pruner.weight.normal_(0, 1.0)
    _, check = folding.fold_variant({"seed_1": model}, test, spec.to_dict(), FOLDING)
    record = check["adasparse"]
    assert record["formulation"] == "binarization" and len(record["sparsity_by_layer"]) == 2
    assert 0 < max(record["sparsity_by_layer"]) < 1
    assert sorted(record["domains"]) == ["2", "3", "4", "5"]
    assert sum(d["rows"] for d in record["domains"].values()) == len(test)
    masks = [d["mean_factors"][0] for d in record["domains"].values()]
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)  # one 0/1 mask per domain
    assert len({tuple(m) for m in masks}) > 1  # the domains are pruned differently
    assert record["pruned_max_abs_diff"] <= FOLDING["tolerance"]
    assert all(d["pruned_parameters"] < check["parameters"] for d in record["domains"].values())
    assert record["pruned_latency"]["pruned_ms"] > 0 and record["pruned_latency"]["masked_ms"] > 0
    # with eq. (3)'s input the masks depend on the instance: no pruned form, sparsity still recorded
    config["adasparse"]["pruner_input"] = "domain_and_hidden"
    _, check = folding.fold_variant({"seed_1": build_model(config, spec)}, test, spec.to_dict(), FOLDING)
    assert "pruned_latency" not in check["adasparse"] and len(check["adasparse"]["domains"]) == 4


def test_domain_gains_bin_domains_by_size_and_count_uplifted_domains() -> None:
    from dynamic_ctr.pipelines.reporting.nodes import domain_gains

    sizes = {"2": 500, "3": 250, "4": 150, "5": 60, "6": 30, "7": 10}  # rows per domain (a long tail)
    base_auc = {d: 0.70 for d in sizes}
    gain = {"2": 0.01, "3": 0.02, "4": -0.01, "5": 0.03, "6": 0.0, "7": 0.05}

    def seeds(offset):
        return {s: {"by_domain": {d: {"auc": base_auc[d] + offset.get(d, 0.0), "samples": n} for d, n in sizes.items()}}
                for s in ("seed_1", "seed_2")}

    metrics = {"base": {"seeds": seeds({})}, "var": {"seeds": seeds(gain)}}
    table, ratios = domain_gains(metrics, {"var": "base", "base": None})
    assert ratios == {"var": pytest.approx(4 / 6)}  # domains 2, 3, 5, 7 beat the base
    by_bin = table.set_index("bin")
    # 1000 rows, bins of 200: domain 2 starts at 0 (bin 1), 3 at 500 (bin 3), 4 at 750 (bin 4),
    # 5 at 900, 6 at 960 and 7 at 990 (bin 5)
    assert list(by_bin.index) == [1, 3, 4, 5] and list(by_bin["domains"]) == [1, 1, 1, 3]
    assert by_bin.loc[5, "samples"] == 100
    assert by_bin.loc[5, "auc_gain_pct"] == pytest.approx(100 * (0.03 * 60 + 0.0 * 30 + 0.05 * 10) / 100)
    assert by_bin.loc[1, "auc_gain_pct"] == pytest.approx(1.0)


def test_parameters_by_grain_count_per_item_domain_parameters_without_allocating(tiny) -> None:
    from dynamic_ctr.pipelines.reporting.nodes import parameters_by_grain

    spec, _ = _with_domains(*tiny)
    configs = {
        "md_dnn": {"family": "dnn", "hidden_units": [16]},
        "star": {"family": "star", "hidden_units": [16], "domain_field": "domain"},
        "apg": {"family": "dnn", "hidden_units": [16], "apg": {"version": "v4", "rank": 2,
                                                               "condition": {"mode": "group", "fields": ["domain"]}}},
    }
    table = parameters_by_grain(configs, spec).set_index("variant")
    assert table.loc["md_dnn", "parameters_coarse"] == table.loc["md_dnn", "parameters_fine"]
    star_fine = build_model({**configs["star"], "domain_field": spec.item_field}, spec)
    from dynamic_ctr.models import count_parameters

    assert table.loc["star", "parameters_fine"] == count_parameters(star_fine) > table.loc["star", "parameters_coarse"]
    # APG generates its per-item parameters: the fine grain costs it only the condition's width
    assert table.loc["apg", "parameters_fine"] == table.loc["apg", "parameters_coarse"]


def test_sweep_plot_draws_auc_against_the_swept_parameter() -> None:
    from dynamic_ctr.pipelines.reporting.nodes import _sweep_plot

    tables = pd.DataFrame({"variant": ["base", "a", "b"], "auc_mean": [0.70, 0.71, 0.72],
                           "auc_ci95_low": [0.69, 0.70, np.nan], "auc_ci95_high": [0.71, 0.72, np.nan]})
    configs = {"base": {"model": {}}, "a": {"model": {"adasparse": {"r_max": 0.5}}},
               "b": {"model": {"adasparse": {"r_max": 0.1}}}}
    sweep = {"title": "3d", "parameter": "model.adasparse.r_max", "variants": ["base", "a", "b", "missing"]}
    ax = _sweep_plot([sweep], tables, configs).axes[0]
    ys = [list(l.get_ydata()) for l in ax.get_lines() if list(l.get_xdata()) == [0.1, 0.5]]
    assert [0.72, 0.71] in ys  # the AUCs, sorted by the parameter (the caps share the x values)
    assert any(list(l.get_ydata()) == [0.70, 0.70] for l in ax.get_lines())  # the base as a reference line
    assert ax.get_xlabel() == "model.adasparse.r_max"
