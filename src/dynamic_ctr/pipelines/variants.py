"""The variant list: the keys of ``variants`` in ``conf/base/parameters_variants.yml``.

Kedro builds pipelines before it resolves an environment's parameters, so the *names*
of the variants come from the base configuration file; an environment may change any
variant's settings (parameters merge softly) but not add or remove variants.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kedro.pipeline import Pipeline, node

VARIANTS_FILE = Path("conf") / "base" / "parameters_variants.yml"


def variant_names(project_path: Path | None = None) -> list[str]:
    """Variant names, in file order, from the project at ``project_path`` (default: cwd,
    else the source checkout this package sits in)."""
    candidates = [project_path] if project_path else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        path = root / VARIANTS_FILE
        if path.is_file():
            variants = (yaml.safe_load(path.read_text()) or {}).get("variants") or {}
            if not variants:
                raise ValueError(f"{path}: 'variants' is empty; define at least one model variant")
            return list(variants)
    raise FileNotFoundError(f"{VARIANTS_FILE} not found under {[str(c) for c in candidates]}")


def variant_pipeline(
    name: str, func: Callable[..., Any], inputs: list[str], outputs: list[str], *, node_name: str,
    shared: set[str], parameters: dict[str, str],
) -> Pipeline:
    """One node as the namespaced copy of variant ``name``: its inputs and outputs become
    ``<name>.<dataset>`` except the ``shared`` datasets and the mapped ``parameters``."""
    return Pipeline(
        [node(func, inputs=inputs, outputs=outputs, name=node_name)],
        namespace=name,
        inputs=shared,
        parameters=parameters,
    )


def per_variant_inputs(names: list[str], datasets: dict[str, str]) -> dict[str, str]:
    """``{"<variant>__<key>": "<variant>.<dataset>"}`` for every variant and every
    ``key: dataset`` pair: the keyword inputs of a node that reads all variants."""
    return {f"{n}__{key}": f"{n}.{dataset}" for n in names for key, dataset in datasets.items()}
