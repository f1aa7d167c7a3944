"""scoring: ``scoring_source`` (a new raw file) -> ``scoring_predictions``.

Not part of ``__default__``. Two pipelines, one scoring node:

- ``scoring`` serves the current champion of the retraining cycle (``retrain.champion``,
  its latest version; ``kedro run --pipeline retrain`` makes one);
- ``scoring_suite`` serves the deployed (folded) model of the suite named by
  ``scoring_suite`` (globals.yml), with the main run's encoders.
"""

from kedro.pipeline import Pipeline, node

from .nodes import score, suite_release

OUTPUTS = ["scoring_predictions", "scoring_quarantine", "scoring_report"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([node(score, inputs=["scoring_source", "params:ingestion", "retrain.champion_served"], outputs=OUTPUTS, name="score")])


def create_suite_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                suite_release,
                inputs=["primary_train", "feature_encoder", "domain_encoder", "feature_spec", "deployed_model"],
                outputs="suite_release",
                name="suite_release",
            ),
            node(score, inputs=["scoring_source", "params:ingestion", "suite_release"], outputs=OUTPUTS, name="score_suite"),
        ]
    )
