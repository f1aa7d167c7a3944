"""The suite plan: every variant resolved and checked on the data before any training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dynamic_ctr.pipelines.planning.nodes import (
    FULL_ONLY_REASON,
    SuitePlanError,
    deep_merge,
    plan_suite,
    resolve_roles,
)
from dynamic_ctr.pipelines.suite import suite_variant_names
from dynamic_ctr.spec import FeatureSpec

PROJECT = Path(__file__).resolve().parents[2]
APG = yaml.safe_load((PROJECT / "conf/base/parameters_apg.yml").read_text())["apg"]
TRAINING = yaml.safe_load((PROJECT / "conf/base/parameters_training.yml").read_text())["training"]
NAMES = suite_variant_names("apg", PROJECT)


@pytest.fixture
def spec(tiny) -> dict:
    """The tiny data's real feature spec, with the context role mapped as in conf/base."""
    return {**tiny[0].to_dict(), "context_field": "hour"}


def _plan(spec: dict, suite: dict | None = None, training: dict | None = None) -> dict:
    return plan_suite(spec, training or TRAINING, suite or APG, suite="apg", registered=NAMES)


def test_the_shipped_suite_plans_every_variant_with_roles_resolved(spec) -> None:
    plan = _plan(spec)
    variants = plan["variants"]
    full_only = {n for n, v in APG["variants"].items() if (v or {}).get("full_only")}
    assert list(variants) == NAMES and all(v["status"] == ("not_applicable" if n in full_only else "ready") for n, v in variants.items())
    full = _plan(spec, training={**TRAINING, "variant_set": "full"})["variants"]
    assert all(v["status"] == "ready" for v in full.values())  # the full set: every variant
    assert variants["wdl_apg_group_user"]["model"]["apg"]["condition"]["fields"] == ["user"]
    assert variants["wdl_apg_group_item"]["model"]["apg"]["condition"]["fields"] == ["item"]
    assert variants["wdl_apg_mix"]["model"]["apg"]["condition"]["fields"] == ["user", "item", "hour"]
    # the defaults block is laid under every variant; the variant's keys win
    assert variants["deepfm_apg"]["model"]["family"] == "deepfm" and variants["deepfm_apg"]["model"]["embedding_dim"] == 16
    assert variants["wdl"]["model"] == APG["defaults"]["model"]
    assert plan["report"]["paper_rows"] and plan["label"].startswith("APG")


def test_budgets_share_the_search_space_and_add_trials_per_own_dimension(spec) -> None:
    variants = _plan(spec, training={**TRAINING, "variant_set": "full"})["variants"]
    common = set(TRAINING["search_space"])
    assert {"train.lr", "train.embedding_weight_decay", "model.dropout"} <= common
    n = TRAINING["study"]["n_trials"]
    per_dim = TRAINING["study"]["trials_per_extra_dimension"]
    for name, v in variants.items():
        assert common <= set(v["search_space"]), name  # every variant searches the shared space
        assert v["budget"]["common_dimensions"] == sorted(common)
        own = v["budget"]["own_dimensions"]
        if name != "wdl_apg_v1":  # the default run's one deliberately short schedule
            assert v["budget"]["common_trials"] == n, name
            assert v["study"]["n_trials"] == n + per_dim * len(own), name
    assert variants["wdl_apg"]["budget"]["own_dimensions"] == ["model.apg.rank"]
    assert variants["wdl_apg"]["study"]["n_trials"] == variants["wdl"]["study"]["n_trials"] + per_dim
    assert variants["wdl_apg_v1"]["budget"]["common_trials"] == 1  # the report marks it unequal


def test_a_data_set_without_the_roles_stops_before_training_naming_every_variant(spec) -> None:
    criteo_like = {**spec, "user_field": None, "item_field": None, "context_field": None}
    with pytest.raises(SuitePlanError) as caught:
        _plan(criteo_like)
    message = str(caught.value)
    assert "3 problem(s)" in message and "nothing was trained" in message
    for name, role in (("wdl_apg_group_user", "@user"), ("wdl_apg_group_item", "@item"), ("wdl_apg_mix", "@user")):
        assert f"- {name}: lacks the field role '{role}'" in message
    assert "apg.not_applicable" in message


def test_declared_not_applicable_variants_are_planned_as_such(spec) -> None:
    criteo_like = {**spec, "user_field": None, "item_field": None, "context_field": None}
    suite = copy.deepcopy(APG)
    suite["not_applicable"] = {n: "no user or item id" for n in ("wdl_apg_group_user", "wdl_apg_group_item", "wdl_apg_mix")}
    variants = _plan(criteo_like, suite)["variants"]
    assert variants["wdl_apg_mix"] == {"status": "not_applicable", "reason": "no user or item id", "compare_to": "wdl"}
    assert variants["wdl_apg"]["status"] == "ready"


def test_impossible_configs_are_all_named_in_one_error(spec) -> None:
    suite = copy.deepcopy(APG)
    suite["variants"]["wdl_apg"]["search_space"]["model.apg.rank"]["choices"] = [4, 100]  # > the 64-wide last layer
    suite["variants"]["wdl_apg_v4"]["model"]["apg"]["condition"] = {"mode": "group", "fields": ["no_such_column"]}
    suite["variants"]["dcn"]["model"]["widht"] = 3
    suite["variants"]["dnn_apg"]["search_space"] = {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}}
    suite["variants"]["deepfm"]["compare_to"] = "deepfm"
    suite["variants"]["wdl_apg_stack3"]["model"]["apg"]["condition"]["fields"] = ["@weather"]
    suite["variants"]["added_by_env"] = {"compare_to": "wdl"}
    suite["not_applicable"] = {"nonexistent": "typo"}
    with pytest.raises(SuitePlanError) as caught:
        _plan(spec, suite)
    message = str(caught.value)
    expected = [
        "- wdl_apg: search_space['model.apg.rank'] value 100: apg.rank=100 exceeds",
        "- wdl_apg_v4: apg.condition.fields: no field 'no_such_column'",
        "- dcn: unknown config key 'widht'",
        "- dnn_apg: search_space redefines the shared dimension(s) ['train.lr']",
        "- deepfm: compare_to='deepfm' is not another variant",
        "- wdl_apg_stack3: unknown field role '@weather'",
        "['added_by_env']: defined by the environment but not in conf/base/parameters_apg.yml",
        "- nonexistent: listed under apg.not_applicable but not a variant",
    ]
    for line in expected:
        assert line in message, line
    assert "8 problem(s)" in message


def test_limits_cap_trials_epochs_seeds_and_rows(spec) -> None:
    training = {**TRAINING, "variant_set": "full", "limits": {"n_trials": 1, "max_epochs": 1, "seeds": 1, "train_rows": 500}}
    for v in _plan(spec, training=training)["variants"].values():
        assert v["study"]["n_trials"] == 1 and v["train"]["max_epochs"] == 1
        assert v["seeds"] == [TRAINING["seeds"][0]] and v["train_rows"] == 500
        assert v["train"]["seed"] == TRAINING["seeds"][0]
    with pytest.raises(SuitePlanError, match="training.limits has unknown key"):
        _plan(spec, training={**TRAINING, "limits": {"epochs": 1}})


def test_unknown_suite_keys_are_refused(spec) -> None:
    with pytest.raises(SuitePlanError, match=r"unknown key\(s\) \['varaints'\]"):
        _plan(spec, {**APG, "varaints": {}})


def test_resolve_roles_and_deep_merge() -> None:
    spec = FeatureSpec.from_dict({"fields": [{"name": "u", "kind": "categorical", "vocab_size": 5, "source": "user"}],
                                  "user_field": "u"})
    assert resolve_roles({"a": ["@user", "x"], "b": {"c": "@user"}}, spec) == {"a": ["u", "x"], "b": {"c": "u"}}
    assert deep_merge({"model": {"a": 1, "b": {"c": 2}}}, {"model": {"b": {"d": 3}}}) == {"model": {"a": 1, "b": {"c": 2, "d": 3}}}


def test_the_paper_protocol_gives_five_seeds_eight_shared_trials_and_equal_budgets(spec) -> None:
    plan = _plan(spec, training={**TRAINING, "protocol": "paper", "variant_set": "full"})
    assert plan["protocol"] == "paper"
    variants = plan["variants"]
    for name, v in variants.items():
        assert len(v["seeds"]) >= 5 and v["budget"]["common_trials"] >= 8, name
        assert v["budget"]["common_trials"] == variants["wdl"]["budget"]["common_trials"], name  # v1 included
        assert v["study"]["n_trials"] == 8 + 2 * len(v["budget"]["own_dimensions"]), name
    assert variants["wdl_apg"]["budget"]["own_dimensions"] == ["model.apg.rank", "model.apg.width"]
    assert _plan(spec)["protocol"] == "default"
    with pytest.raises(SuitePlanError, match=r"training.protocol='papr' is not one of"):
        _plan(spec, training={**TRAINING, "protocol": "papr"})


def test_conf_paper_selects_the_paper_protocol() -> None:
    paper = yaml.safe_load((PROJECT / "conf/paper/parameters.yml").read_text())
    assert paper == {"training": {"protocol": "paper"}}



def test_the_dynint_suite_plans_on_the_shipped_spec_with_its_own_shared_space(spec) -> None:
    suite = yaml.safe_load((PROJECT / "conf/base/parameters_dynint.yml").read_text())["dynint"]
    names = suite_variant_names("dynint", PROJECT)
    variants = plan_suite(spec, {**TRAINING, "variant_set": "full"}, suite, suite="dynint", registered=names)["variants"]
    pins = {n: v for n, v in variants.items() if v["model"]["family"] == "xdeepint"}
    assert [v["model"]["dynint"]["mode"] for v in pins.values()] == ["static", "da", "dgp", "dwp"]
    shared = set(suite["search_space"])
    assert "model.dropout" not in shared  # no dropout in a PIN: the suite's own shared space
    for name, v in variants.items():
        assert v["budget"]["common_dimensions"] == sorted(shared), name
        assert v["budget"]["common_trials"] == TRAINING["study"]["n_trials"], name
    for name, v in pins.items():
        assert {"model.dynint.layers", "model.dynint.subspaces"} <= set(v["budget"]["own_dimensions"]), name
    assert variants["dynint_dgp"]["budget"]["own_dimensions"] == [
        "model.dynint.layers", "model.dynint.orthogonal_rate", "model.dynint.rank", "model.dynint.reduction",
        "model.dynint.subspaces"]
    # Table 1's reference rows and Table 2's layers alone: no PIN config, no own dimensions
    references = {n: v["model"] for n, v in variants.items() if n not in pins}
    assert {n: (m["family"], m["dnn"]) for n, m in references.items()} == {
        "lr": ("wdl", False), "fm": ("deepfm", False), "ref_dnn": ("dnn", True), "ref_wdl": ("wdl", True),
        "ref_deepfm": ("deepfm", True), "ref_dcn": ("dcn", True), "ref_dcnv2": ("dcnv2", True),
        "ref_deepcrossing": ("deepcrossing", True), "ref_pnn": ("pnn", True), "ref_xdeepfm": ("xdeepfm", True),
        "ref_autoint": ("autoint", True), "ref_fibinet": ("fibinet", True),
        "crossnet": ("dcn", False), "crossnet_v2": ("dcnv2", False), "pnn_layer": ("pnn", False), "cin": ("xdeepfm", False),
        "autoint_layer": ("autoint", False)}
    assert all(m.get("dynint") is None and m["embedding_dim"] == 16 for m in references.values())
    assert all(variants[n]["budget"]["own_dimensions"] == [] for n in references)


def test_the_dynint_paper_protocol_gives_pin_models_and_lr_fm_the_papers_optimisers(spec) -> None:
    """§4.1.4: G-FTRL for the embedding table and FTRL for the PIN (LR, FM: FTRL), each
    group's lr tuned in [1e-2, 1e-1]; the DNN reference rows keep Adam."""
    suite = yaml.safe_load((PROJECT / "conf/base/parameters_dynint.yml").read_text())["dynint"]
    names = suite_variant_names("dynint", PROJECT)
    training = {**TRAINING, "protocol": "paper", "protocols": {"paper": {"seeds": [1, 2, 3, 4, 5]}}}
    variants = plan_suite(spec, training, suite, suite="dynint", registered=names)["variants"]
    for name in ("xdeepint", "dynint_da", "dynint_dgp", "dynint_dwp"):
        groups = variants[name]["train"]["group_optimizers"]
        assert {r: g["optimizer"] for r, g in groups.items()} == {"embedding": "gftrl", "interaction": "ftrl"}, name
        assert variants[name]["search_space"]["train.group_optimizers.interaction.lr"] == {
            "type": "float", "low": 0.01, "high": 0.1, "log": True}
    for name in ("lr", "fm"):
        assert variants[name]["train"]["group_optimizers"] == {"embedding": {"optimizer": "ftrl", "lr": 0.05, "beta": 0.1}}
    for name in ("ref_dnn", "ref_wdl", "ref_deepfm", "ref_dcn", "ref_dcnv2", "crossnet", "crossnet_v2"):
        assert not variants[name]["train"].get("group_optimizers"), name


@pytest.mark.parametrize("report, message", [
    ({"paper_rows": [{"table": "T", "row": "r", "variant": "xdeepint", "base": "xdeepnt", "paper_base": 1, "paper_variant": 2}]},
     r"report.paper_rows\[0\] names \['xdeepnt'\]"),
    ({"tables": [{"title": "T", "variants": ["fm", "ffm"]}]}, r"report.tables\[0\].variants names \['ffm'\]"),
    ({"tables": [{"title": "T", "paper": {"lr": {"auc": 0.8, "gauc": 0.7}}}]}, r"report.tables\[0\].paper.lr"),
    ({"tables": [{"variants": ["fm"]}]}, r"needs a 'title'"),
    ({"paper_row": []}, r"unknown key\(s\) \['paper_row'\]"),
])
def test_a_report_naming_no_variant_stops_the_plan(spec, report, message) -> None:
    suite = yaml.safe_load((PROJECT / "conf/base/parameters_dynint.yml").read_text())["dynint"]
    names = suite_variant_names("dynint", PROJECT)
    with pytest.raises(SuitePlanError, match=message):
        plan_suite(spec, TRAINING, {**suite, "report": report}, suite="dynint", registered=names)


def test_the_multidomain_suite_plans_with_its_domain_and_item_roles(tiny) -> None:
    from dynamic_ctr.spec import FieldSpec

    suite = yaml.safe_load((PROJECT / "conf/base/parameters_multidomain.yml").read_text())["multidomain"]
    names = suite_variant_names("multidomain", PROJECT)
    with_domains = tiny[0].with_field(FieldSpec("domain", "categorical", vocab_size=9, source="domain"), domain_field="domain")
    variants = plan_suite({**with_domains.to_dict(), "context_field": "hour"}, TRAINING, suite, suite="multidomain",
                          registered=names)["variants"]
    assert all(v["status"] == "ready" for n, v in variants.items() if n != "star_item")
    assert variants["star_item"] == {"status": "not_applicable", "reason": FULL_ONLY_REASON, "compare_to": "md_dnn"}
    assert variants["star"]["model"]["domain_field"] == "domain" and variants["star"]["model"]["hidden_units"] == [128, 64, 32]
    assert variants["dnn_adasparse"]["model"]["adasparse"]["fields"] == ["domain"]
    assert variants["dnn_apg_item"]["model"]["apg"]["condition"]["fields"] == ["item"]
    assert variants["mmoe_item"]["model"]["domain_field"] == "item" and variants["mmoe"]["model"]["domain_field"] == "domain"
    full = plan_suite({**with_domains.to_dict(), "context_field": "hour"}, {**TRAINING, "variant_set": "full"}, suite,
                      suite="multidomain", registered=names)["variants"]
    assert full["star_item"]["status"] == "ready" and full["star_item"]["model"]["domain_field"] == "item"
    formulations = {n: v["model"]["adasparse"]["formulation"] for n, v in variants.items()
                    if "adasparse" in v.get("model", {})}
    assert set(formulations.values()) == {"binarization", "scaling", "fusion"}
    assert all(variants[n]["compare_to"] in ("md_dnn", "md_dcnv2") for n in formulations)
    # without a domain field the plan stops before training, naming every variant that needs one
    with pytest.raises(SuitePlanError, match=r"star: lacks the field role '@domain'"):
        plan_suite({**tiny[0].to_dict(), "context_field": "hour"}, TRAINING, suite, suite="multidomain", registered=names)


def test_full_only_variants_are_checked_but_left_out_of_the_default_set(spec) -> None:
    training = TRAINING
    suite = {"defaults": {"model": {"family": "wdl", "embedding_dim": 4, "hidden_units": [8], "dropout": 0.0}},
             "variants": {"wdl": {}, "big": {"full_only": True, "compare_to": "wdl", "model": {"hidden_units": [16]}}}}
    default = plan_suite(spec, training, suite, suite="s", registered=["wdl", "big"])
    assert default["variants"]["wdl"]["status"] == "ready"
    assert default["variants"]["big"] == {"status": "not_applicable", "reason": FULL_ONLY_REASON, "compare_to": "wdl"}
    full = plan_suite(spec, {**training, "variant_set": "full"}, suite, suite="s", registered=["wdl", "big"])
    assert full["variants"]["big"]["status"] == "ready"
    broken = {**suite, "variants": {**suite["variants"], "big": {"full_only": True, "model": {"hidden_units": [0]}}}}
    with pytest.raises(SuitePlanError, match="big: "):  # left out, yet checked before any training
        plan_suite(spec, training, broken, suite="s", registered=["wdl", "big"])
    with pytest.raises(SuitePlanError, match="training.variant_set='all' must be one of"):
        plan_suite(spec, {**training, "variant_set": "all"}, suite, suite="s", registered=["wdl", "big"])


def test_data_parallel_ranks_are_planned_per_variant(tiny) -> None:
    """``training.data_parallel.ranks``: every variant DDP can train gets the ranks and no
    per-epoch resume state; STAR (sparse per-domain gradients) and MAML (its own
    objective) fall back to one process with the reason; a global batch the ranks cannot
    divide, or a bad setting, stops the plan."""
    from dynamic_ctr.spec import FieldSpec

    suite = yaml.safe_load((PROJECT / "conf/base/parameters_multidomain.yml").read_text())["multidomain"]
    names = suite_variant_names("multidomain", PROJECT)
    spec = {**tiny[0].with_field(FieldSpec("domain", "categorical", vocab_size=9, source="domain"), domain_field="domain").to_dict(),
            "context_field": "hour"}
    training = deep_merge(TRAINING, {"data_parallel": {"ranks": 2}})
    variants = plan_suite(spec, training, suite, suite="multidomain", registered=names)["variants"]
    assert variants["md_dnn"]["data_parallel"] == {"ranks": 2, "reason": None}
    assert variants["md_dnn"]["study"]["checkpoint_dir"] is None
    assert variants["star"]["data_parallel"]["ranks"] == 1
    assert "trains in one process: model STAR has parameters with sparse gradients" in variants["star"]["data_parallel"]["reason"]
    maml = next(n for n in names if "maml" in n)
    assert variants[maml]["data_parallel"]["ranks"] == 1 and "meta_loss" in variants[maml]["data_parallel"]["reason"]
    single = plan_suite(spec, TRAINING, suite, suite="multidomain", registered=names)["variants"]["md_dnn"]
    assert single["data_parallel"] == {"ranks": 1, "reason": None} and single["study"]["checkpoint_dir"]

    with pytest.raises(SuitePlanError, match=r"md_dnn: training.data_parallel.ranks=3 does not divide the global batch size\(s\) \[1024\]"):
        plan_suite(spec, deep_merge(TRAINING, {"data_parallel": {"ranks": 3}}), suite, suite="multidomain", registered=names)
    for bad, message in (({"ranks": 0}, "must be an int >= 1"), ({"procs": 2}, r"unknown key\(s\) \['procs'\]")):
        with pytest.raises(SuitePlanError, match=message):
            plan_suite(spec, {**TRAINING, "data_parallel": bad}, suite, suite="multidomain", registered=names)


def test_more_data_parallel_ranks_than_gpus_stop_the_plan(tiny, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    training = deep_merge(TRAINING, {"data_parallel": {"ranks": 2}, "device": "cuda"})
    with pytest.raises(SuitePlanError, match=r"ranks=2 needs one GPU per rank on cuda; this machine has 1"):
        _plan({**tiny[0].to_dict(), "context_field": "hour"}, training=training)
