"""features: clean_interactions -> primary splits -> fitted encoder -> encoded splits."""

from kedro.pipeline import Pipeline, node

from .nodes import encode_splits, fit_encoder, split_interactions


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                split_interactions,
                inputs=["clean_interactions", "table_schema", "ingestion_check", "params:features.split"],
                outputs=["primary_train", "primary_valid", "primary_test", "split_summary"],
                name="split_interactions",
            ),
            node(
                fit_encoder,
                inputs=["primary_train", "table_schema", "params:features.encoder", "params:features.roles"],
                outputs=["feature_encoder", "base_feature_spec"],
                name="fit_encoder",
            ),
            node(
                encode_splits,
                inputs=["feature_encoder", "primary_train", "primary_valid", "primary_test"],
                outputs=["encoded_train", "encoded_valid", "encoded_test", "encoding_report"],
                name="encode_splits",
            ),
        ]
    )
