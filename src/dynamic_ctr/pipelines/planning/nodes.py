"""Planning: each variant of a suite resolved into what its training node runs, and
checked against the data before anything trains.

A variant's settings are the suite's ``defaults`` with the variant's own entry laid
over them (a deep merge), over the shared ``training`` parameters. Model configs may
name fields by role (``"@user"``, ``"@item"``, ``"@context"``, ``"@domain"``), mapped
per data set in the feature spec, or by column name.

A protocol (``training.protocol``, e.g. ``paper``) is a named preset laid over the
training parameters (``training.protocols.<name>``) and over the suite's
(``<suite>.protocols.<name>``): seeds, trials, epochs, per-variant search spaces.

Budgets are equal by construction: every variant searches the shared
``training.search_space`` (learning rate, embedding L2, dropout; a suite may replace it with
its own ``search_space``, the same for all its variants) with
``training.study.n_trials`` trials; a variant's own dimensions (APG's K, P, J, ...) come
on top, each with ``study.trials_per_extra_dimension`` more trials.
"""

from __future__ import annotations

import copy
from typing import Any

from dynamic_ctr.models.config import resolve_config
from dynamic_ctr.spec import ROLES, FeatureSpec
from dynamic_ctr.training.loop import TrainConfig
from dynamic_ctr.training.tuning import StudyConfig, apply_overrides, validate_space

VARIANT_KEYS = {"model", "train", "study", "seeds", "search_space", "compare_to", "full_only"}
#: ``training.variant_set``: ``default`` leaves out the variants marked ``full_only``
#: (planned, checked, reported as not run); ``full`` trains every variant.
VARIANT_SETS = ("default", "full")
SUITE_KEYS = {"label", "defaults", "variants", "not_applicable", "report", "protocols", "search_space"}
LIMIT_KEYS = {"n_trials", "max_epochs", "seeds", "train_rows"}


class SuitePlanError(ValueError):
    """One or more variants of a suite cannot run on this data (all are listed)."""


FULL_ONLY_REASON = "left out of the default run; the full set trains it (kedro run --params training.variant_set=full)"


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` laid onto ``base``: dicts merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = deep_merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


class MissingRoleError(ValueError):
    """A config names a field by a role this data set does not map."""


def resolve_roles(value: Any, spec: FeatureSpec) -> Any:
    """``value`` with every string ``"@<role>"`` (at any depth) replaced by the field the
    feature spec maps that role to."""
    if isinstance(value, dict):
        return {k: resolve_roles(v, spec) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_roles(v, spec) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        role = value[1:]
        if role not in ROLES:
            raise ValueError(f"unknown field role {value!r}; roles: {['@' + r for r in ROLES]}")
        field = spec.field_for_role(role)
        if field is None:
            raise MissingRoleError(f"lacks the field role {value!r} (this data set maps no {role} field)")
        return field
    return value


def variant_settings(training: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """``training`` with the variant's ``train``, ``study`` and ``seeds`` laid over it;
    the search space is the shared one plus the variant's own dimensions."""
    unknown = set(variant) - VARIANT_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
    if not variant.get("model"):
        raise ValueError("needs a 'model' config (in the variant or the suite's defaults)")
    common = dict(training.get("search_space") or {})
    own = dict(variant.get("search_space") or {})
    overlap = sorted(set(own) & set(common))
    if overlap:
        raise ValueError(
            f"search_space redefines the shared dimension(s) {overlap}: every variant and its base search "
            "training.search_space alike (equal budgets); a variant adds only its own dimensions"
        )
    study = {**training["study"], **(variant.get("study") or {})}
    seeds = variant.get("seeds") or training["seeds"]
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of distinct non-negative ints")
    return {
        "train": {**training["train"], **(variant.get("train") or {})},
        "study": study,
        "seeds": [int(s) for s in seeds],
        "common_space": common,
        "own_space": own,
    }


def apply_limits(settings: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """Caps for smoke runs (``training.limits``, checked by :func:`plan_suite`): trials,
    epochs and seeds here; training rows in the training node."""
    out = copy.deepcopy(settings)
    if limits.get("n_trials"):
        out["study"]["n_trials"] = min(out["study"]["n_trials"], int(limits["n_trials"]))
        out["study"]["trials_per_extra_dimension"] = 0
    if limits.get("max_epochs"):
        out["train"]["max_epochs"] = min(out["train"]["max_epochs"], int(limits["max_epochs"]))
    if limits.get("seeds"):
        out["seeds"] = out["seeds"][: int(limits["seeds"])]
    return out


def _dimension_values(dist: dict[str, Any]) -> list[Any]:
    """The values of a search dimension that bound what a trial may build."""
    return list(dist["choices"]) if dist["type"] == "categorical" else [dist["low"], dist["high"]]


def _check_model(config: dict[str, Any], spec: FeatureSpec, space: dict[str, Any]) -> None:
    """The base model config, and each extreme value of each model dimension of the
    search space, must build on this spec (fields exist, ranks fit the widths)."""
    resolve_config(config["model"], spec)
    validate_space(space)
    apply_overrides(config, {path: None for path in space})  # every path exists
    for path, dist in space.items():
        if not path.startswith("model."):
            continue
        for value in _dimension_values(dist):
            try:
                resolve_config(apply_overrides(config, {path: value})["model"], spec)
            except ValueError as e:
                raise ValueError(f"search_space[{path!r}] value {value!r}: {e}") from None


def in_memory_limit(training: dict[str, Any]) -> str | float:
    """``training.in_memory_limit_mb`` (``"auto"`` when unset), checked: the most MB a
    lazily loaded training split may take as tensors before it is read by row group."""
    value = training.get("in_memory_limit_mb", "auto")
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SuitePlanError(f"training.in_memory_limit_mb={value!r} must be 'auto' or a number of MB >= 0")
    return float(value)


def data_parallel_ranks(training: dict[str, Any]) -> int:
    """``training.data_parallel.ranks`` (1 when unset), checked."""
    settings = training.get("data_parallel") or {}
    unknown = set(settings) - {"ranks"}
    if unknown:
        raise SuitePlanError(f"training.data_parallel has unknown key(s) {sorted(unknown)}; known: ['ranks']")
    ranks = settings.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise SuitePlanError(f"training.data_parallel.ranks={ranks!r} must be an int >= 1")
    if ranks > 1:
        import torch

        from dynamic_ctr.training.device import resolve_device

        device = resolve_device(str(training.get("device", "auto")))
        if device.type == "cuda" and torch.cuda.device_count() < ranks:
            raise SuitePlanError(
                f"training.data_parallel.ranks={ranks} needs one GPU per rank on {device.type}; "
                f"this machine has {torch.cuda.device_count()}"
            )
    return ranks


def _plan_data_parallel(config: dict[str, Any], space: dict[str, Any], study: dict[str, Any], spec: FeatureSpec, ranks: int) -> dict[str, Any]:
    """How a variant trains with ``ranks`` data-parallel ranks: ``{"ranks", "reason"}``.

    A model DDP cannot train (MAML's own objective, STAR's sparse per-domain gradients,
    see :meth:`~dynamic_ctr.training.distributed.World.check_supported`) trains in one
    process, the reason recorded. A global batch (the base's or a searched one) that
    the ranks cannot divide is an error. Per-epoch resume state is single-process: the
    study's ``checkpoint_dir`` is dropped (in ``study``), a killed run resumes its study
    from the finished trials.
    """
    if ranks == 1:
        return {"ranks": 1, "reason": None}
    from dynamic_ctr.models import build_model
    from dynamic_ctr.training.distributed import World

    sizes = [config["train"]["batch_size"]]
    if "train.batch_size" in space:
        sizes += _dimension_values(space["train.batch_size"])
    uneven = [b for b in sizes if int(b) % ranks]
    if uneven:
        raise ValueError(f"training.data_parallel.ranks={ranks} does not divide the global batch size(s) {uneven}")
    study["checkpoint_dir"] = None
    try:
        World(size=ranks).check_supported(build_model(config["model"], spec), config["train"]["batch_size"], None)
    except ValueError as e:
        return {"ranks": 1, "reason": f"trains in one process: {e}"}
    return {"ranks": ranks, "reason": None}


def _plan_variant(name: str, entry: dict[str, Any], training: dict[str, Any], limits: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
    settings = apply_limits(variant_settings(training, entry), limits)
    extra = settings["study"].pop("trials_per_extra_dimension", 0)
    n_own = len(settings["own_space"])
    common_trials = settings["study"]["n_trials"]
    settings["study"]["n_trials"] = common_trials + int(extra) * n_own
    StudyConfig(study_name=name, **settings["study"])  # unknown or bad study keys fail here
    space = {**settings["common_space"], **settings["own_space"]}
    model = resolve_roles(entry["model"], spec)
    train = {**settings["train"], "seed": settings["seeds"][0]}
    TrainConfig.from_dict(train)
    config = {"model": model, "train": train}
    _check_model(config, spec, space)
    data_parallel = _plan_data_parallel(config, space, settings["study"], spec, data_parallel_ranks(training))
    return {
        "status": "ready",
        "reason": None,
        "compare_to": entry.get("compare_to"),
        "model": model,
        "train": train,
        "study": settings["study"],
        "seeds": settings["seeds"],
        "search_space": space,
        "train_rows": limits.get("train_rows"),
        "data_parallel": data_parallel,
        "in_memory_limit_mb": in_memory_limit(training),
        "budget": {
            "n_trials": settings["study"]["n_trials"],
            "common_trials": common_trials,
            "common_dimensions": sorted(settings["common_space"]),
            "own_dimensions": sorted(settings["own_space"]),
            "max_epochs": train["max_epochs"],
            "seeds": len(settings["seeds"]),
            "timeout_s": settings["study"].get("timeout"),
        },
    }


def plan_suite(
    feature_spec: dict[str, Any], training: dict[str, Any], suite_params: dict[str, Any], *, suite: str, registered: list[str]
) -> dict[str, Any]:
    """Resolve and check every variant of ``suite`` on this data; raise once, listing
    every variant that cannot run, before any training starts.

    A variant whose field role the data set lacks stops the run unless the environment
    lists it under ``<suite>.not_applicable`` (``{variant: reason}``); it is then
    planned as ``not_applicable`` and the report says so.

    Returns:
        ``{"suite", "label", "variants": {name: plan entry}, "report"}``; a ready entry
        holds the resolved ``model``, ``train`` (seeded with the first seed), ``study``,
        ``seeds``, ``search_space``, ``compare_to``, ``train_rows`` and its ``budget``.

    Raises:
        SuitePlanError: names every variant that cannot run and why.
    """
    spec = FeatureSpec.from_dict(feature_spec)
    where = f"suite {suite!r}"
    unknown = set(suite_params) - SUITE_KEYS
    if unknown:
        raise SuitePlanError(f"{where}: parameters '{suite}' have unknown key(s) {sorted(unknown)}; known: {sorted(SUITE_KEYS)}")
    training, suite_params, protocol = apply_protocol(training, suite_params, suite)
    if suite_params.get("search_space") is not None:  # the suite's own shared space, e.g. without dropout
        training = {**training, "search_space": suite_params["search_space"]}
    variants = suite_params.get("variants") or {}
    defaults = suite_params.get("defaults") or {}
    declared = suite_params.get("not_applicable") or {}
    limits = training.get("limits") or {}
    data_parallel_ranks(training)  # a bad setting stops the plan once, not per variant
    in_memory_limit(training)
    variant_set = training.get("variant_set") or "default"
    if variant_set not in VARIANT_SETS:
        raise SuitePlanError(f"training.variant_set={variant_set!r} must be one of {list(VARIANT_SETS)}")
    unknown = set(limits) - LIMIT_KEYS
    if unknown:
        raise SuitePlanError(f"training.limits has unknown key(s) {sorted(unknown)}; known: {sorted(LIMIT_KEYS)}")
    problems: list[str] = []
    added = [n for n in variants if n not in registered]
    if added:
        problems.append(
            f"{added}: defined by the environment but not in conf/base/parameters_{suite}.yml; pipelines are built "
            "from the base file, so add them there (an environment may only change or declare variants not applicable)"
        )
    for name in declared:
        if name not in registered:
            problems.append(f"{name}: listed under {suite}.not_applicable but not a variant of the suite")

    plan: dict[str, dict[str, Any]] = {}
    for name in registered:
        if name not in variants:
            problems.append(f"{name}: no parameters under {suite}.variants")
            continue
        entry = deep_merge(defaults, variants[name] or {})
        base = entry.get("compare_to")
        if base is not None and (base not in registered or base == name):
            problems.append(f"{name}: compare_to={base!r} is not another variant of the suite")
            continue
        if name in declared:
            plan[name] = {"status": "not_applicable", "reason": str(declared[name]), "compare_to": base}
            continue
        try:
            plan[name] = _plan_variant(name, entry, training, limits, spec)  # checked even when left out
            if entry.get("full_only") and variant_set != "full":
                plan[name] = {"status": "not_applicable", "reason": FULL_ONLY_REASON, "compare_to": base}
        except MissingRoleError as e:
            problems.append(f"{name}: {e}; if this data set cannot have it, declare it under {suite}.not_applicable")
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{name}: {e}")
    problems += report_problems(suite_params.get("report") or {}, registered, suite)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SuitePlanError(f"{where}: {len(problems)} problem(s) found before training; nothing was trained:\n{lines}")
    return {
        "suite": suite, "label": suite_params.get("label", suite), "protocol": protocol, "variants": plan,
        "report": suite_params.get("report") or {},
    }


REPORT_KEYS = {"frequency_plot_variants", "paper_rows", "tables", "sweeps"}
SWEEP_KEYS = {"title", "parameter", "variants"}
PAPER_ROW_KEYS = {"table", "row", "variant", "base", "paper_base", "paper_variant"}
TABLE_KEYS = {"title", "variants", "paper"}
PAPER_METRICS = {"auc", "logloss", "gauc_domain"}


def report_problems(report: dict[str, Any], registered: list[str], suite: str) -> list[str]:
    """What in ``<suite>.report`` names no variant of the suite, or has unknown keys:
    found here so a typo stops the run before training, not after it."""
    where, problems = f"{suite}.report", []
    known = set(registered)

    def check_names(names: Any, at: str) -> None:
        missing = [n for n in (names or []) if n not in known]
        if missing:
            problems.append(f"{at} names {missing}, not variant(s) of the suite")

    unknown = set(report) - REPORT_KEYS
    if unknown:
        problems.append(f"{where} has unknown key(s) {sorted(unknown)}; known: {sorted(REPORT_KEYS)}")
    check_names(report.get("frequency_plot_variants"), f"{where}.frequency_plot_variants")
    for i, row in enumerate(report.get("paper_rows") or []):
        at = f"{where}.paper_rows[{i}]"
        if set(row) != PAPER_ROW_KEYS:
            problems.append(f"{at} needs exactly the keys {sorted(PAPER_ROW_KEYS)}, has {sorted(row)}")
            continue
        check_names([row["variant"], row["base"]], at)
    for i, sweep in enumerate(report.get("sweeps") or []):
        at = f"{where}.sweeps[{i}]"
        if set(sweep) != SWEEP_KEYS:
            problems.append(f"{at} needs exactly the keys {sorted(SWEEP_KEYS)}, has {sorted(sweep)}")
            continue
        check_names(sweep["variants"], f"{at}.variants")
    for i, table in enumerate(report.get("tables") or []):
        at = f"{where}.tables[{i}]"
        if "title" not in table or set(table) - TABLE_KEYS:
            problems.append(f"{at} needs a 'title' and may have only {sorted(TABLE_KEYS)}, has {sorted(table)}")
            continue
        check_names(table.get("variants"), f"{at}.variants")
        paper = table.get("paper") or {}
        check_names(list(paper), f"{at}.paper")
        for name, figures in paper.items():
            if not isinstance(figures, dict) or not set(figures) <= PAPER_METRICS:
                problems.append(f"{at}.paper.{name}={figures!r} must map some of {sorted(PAPER_METRICS)} to numbers")
    return problems


def apply_protocol(training: dict[str, Any], suite_params: dict[str, Any], suite: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``training`` and ``suite_params`` with the protocol named by
    ``training.protocol`` laid over them (none: both unchanged, protocol ``default``).

    Raises:
        SuitePlanError: an unknown protocol name.
    """
    name = training.get("protocol")
    presets = training.get("protocols") or {}
    suite_presets = suite_params.get("protocols") or {}
    training = {k: v for k, v in training.items() if k not in ("protocol", "protocols")}
    suite_params = {k: v for k, v in suite_params.items() if k != "protocols"}
    if not name:
        return training, suite_params, "default"
    if name not in presets:
        raise SuitePlanError(f"training.protocol={name!r} is not one of training.protocols {sorted(presets)}")
    unknown = set(presets[name] or {}) - {"seeds", "train", "study", "search_space"}
    if unknown:
        raise SuitePlanError(f"training.protocols.{name} has unknown key(s) {sorted(unknown)}")
    suite_preset = suite_presets.get(name) or {}
    if set(suite_preset) - {"defaults", "variants"}:
        raise SuitePlanError(f"{suite}.protocols.{name} may set only 'defaults' and 'variants'")
    return deep_merge(training, presets[name] or {}), deep_merge(suite_params, suite_preset), name
