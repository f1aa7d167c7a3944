"""Project pipelines: every folder under ``pipelines/`` is found automatically."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: Run on demand only (they need input that a training run does not make).
ON_DEMAND = ("scoring",)


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines; ``__default__`` runs all but the on-demand
    ones (ingestion -> features -> domains -> training -> folding -> reporting)."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(p for name, p in pipelines.items() if name not in ON_DEMAND)
    return pipelines
