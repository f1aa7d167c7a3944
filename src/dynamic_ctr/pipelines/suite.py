"""Experiment suites: named sets of model variants, each a registered pipeline.

A suite ``<suite>`` lives in ``conf/base/parameters_<suite>.yml`` under the top-level key
``<suite>``: a ``defaults`` block laid under every variant, the ``variants``, the
``not_applicable`` variants of a data set, and its ``report`` settings. ``kedro run
--pipeline <suite>`` runs the data pipelines and then, per variant, the namespaced
training, folding and evaluation nodes (datasets ``<variant>.<name>``), and the suite's
own plan, deployment and report nodes (datasets ``<suite>.<name>``).

Kedro builds pipelines before it resolves an environment's parameters, so the *names*
of a suite's variants come from the base file; an environment changes their settings
(parameters merge softly) or declares some not applicable, but cannot add or remove
one. The suite's plan node (``pipelines/planning``) checks every variant against the
data before any training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kedro.pipeline import Pipeline, node

#: Every suite, in report order; each is a pipeline of the same name.
SUITES = ("apg", "dynint", "multidomain")
#: The suites ``__default__`` runs: those that fit the shipped MovieLens data.
DEFAULT_SUITES = ("apg", "dynint", "multidomain")


def suite_file(suite: str) -> Path:
    return Path("conf") / "base" / f"parameters_{suite}.yml"


def suite_variant_names(suite: str, project_path: Path | None = None) -> list[str]:
    """The variant names of ``suite``, in file order, from the project at
    ``project_path`` (default: cwd, else the source checkout this package sits in)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {list(SUITES)}")
    candidates = [project_path] if project_path else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        path = root / suite_file(suite)
        if path.is_file():
            block = (yaml.safe_load(path.read_text()) or {}).get(suite) or {}
            variants = block.get("variants") or {}
            if not variants:
                raise ValueError(f"{path}: '{suite}.variants' is empty; define at least one model variant")
            return list(variants)
    raise FileNotFoundError(f"{suite_file(suite)} not found under {[str(c) for c in candidates]}")


def all_variant_names(project_path: Path | None = None) -> dict[str, str]:
    """``{variant: suite}`` over every suite; a name used by two suites is an error
    (variant datasets are namespaced by the variant name alone)."""
    owners: dict[str, str] = {}
    for suite in SUITES:
        for name in suite_variant_names(suite, project_path):
            if name in owners:
                raise ValueError(f"variant {name!r} is defined by suites {owners[name]!r} and {suite!r}; names must be unique")
            if name in SUITES:
                raise ValueError(f"variant {name!r} of suite {suite!r} has a suite's name")
            owners[name] = suite
    return owners


def variant_pipeline(
    name: str, func: Callable[..., Any], inputs: list[str], outputs: list[str], *, node_name: str,
    shared: set[str], parameters: dict[str, str] | None = None,
) -> Pipeline:
    """One node as the namespaced copy of variant ``name``: its inputs and outputs become
    ``<name>.<dataset>`` except the ``shared`` datasets and the mapped ``parameters``."""
    return Pipeline(
        [node(func, inputs=inputs, outputs=outputs, name=node_name)],
        namespace=name,
        inputs=shared,
        parameters=parameters or {},
    )


def per_variant_inputs(names: list[str], datasets: dict[str, str]) -> dict[str, str]:
    """``{"<variant>__<key>": "<variant>.<dataset>"}`` for every variant and every
    ``key: dataset`` pair: the keyword inputs of a node that reads all variants."""
    return {f"{n}__{key}": f"{n}.{dataset}" for n in names for key, dataset in datasets.items()}
