"""Project pipelines: the data pipelines, one pipeline per experiment suite, scoring.

- ``ingestion``, ``features``, ``domains`` and ``data`` (the three in a row);
- ``stream_data``: what ``data`` writes, from a log read batch by batch (environments
  with a ``raw_stream``: criteo, avazu), and ``stream_<suite>`` (it, then the suite);
- ``<suite>`` for every suite in ``pipelines.suite.SUITES`` (``kedro run --pipeline
  apg``): the data pipelines, then the suite's planning, training, folding and
  reporting;
- ``scoring`` (the retraining champion) and ``scoring_suite`` (a suite's deployed
  model): on demand only (they need a model and new raw files);
- ``partition_log``, ``retrain``, ``rollback``: scheduled retraining (README);
- ``spark_data``: ingestion, the hash split and encoding on Spark (``--env spark``;
  needs the ``spark`` extra);
- ``__default__``: the data pipelines and the suites that fit the shipped data.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from dynamic_ctr.pipelines import domains, features, folding, ingestion, planning, reporting, retrain, scoring, spark, streaming, training
from dynamic_ctr.pipelines.suite import DEFAULT_SUITES, SUITES, all_variant_names


def suite_pipeline(suite: str) -> Pipeline:
    """Planning, training, folding and reporting of one suite (no data pipelines)."""
    return sum(
        (module.create_pipeline(suite=suite) for module in (planning, training, folding, reporting)), Pipeline([])
    )


def register_pipelines() -> dict[str, Pipeline]:
    all_variant_names()  # variant names must be unique across suites
    data = ingestion.create_pipeline() + features.create_pipeline() + domains.create_pipeline()
    suites = {suite: suite_pipeline(suite) for suite in SUITES}
    return {
        "ingestion": ingestion.create_pipeline(),
        "features": features.create_pipeline(),
        "domains": domains.create_pipeline(),
        "data": data,
        **{suite: data + pipeline for suite, pipeline in suites.items()},
        "stream_data": streaming.create_pipeline(),
        **{f"stream_{suite}": streaming.create_pipeline() + pipeline for suite, pipeline in suites.items()},
        "scoring": scoring.create_pipeline(),
        "scoring_suite": scoring.create_suite_pipeline(),
        "partition_log": retrain.create_partition_pipeline(),
        "retrain": retrain.create_pipeline(),
        "rollback": retrain.create_rollback_pipeline(),
        "spark_data": spark.create_pipeline(),
        "__default__": data + sum((suites[s] for s in DEFAULT_SUITES), Pipeline([])),
    }
