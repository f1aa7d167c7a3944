"""scoring: ``scoring_source`` (a new raw file) -> ``scoring_predictions`` with the
deployed (folded) model. Not part of ``__default__``: ``kedro run --pipeline scoring``."""

from kedro.pipeline import Pipeline, node

from .nodes import score


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                score,
                inputs=["scoring_source", "params:ingestion", "primary_train", "feature_encoder", "domain_encoder", "feature_spec", "deployed_model"],
                outputs=["scoring_predictions", "scoring_quarantine", "scoring_report"],
                name="score",
            )
        ]
    )
