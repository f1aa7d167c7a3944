"""domains: primary + encoded splits -> model inputs with domain ids, stats, activity groups."""

from kedro.pipeline import Pipeline, node

from .nodes import assign_domains, fit_domains, fit_frequency_groups


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(fit_domains, inputs=["primary_train", "params:domains"], outputs="domain_encoder", name="fit_domains"),
            node(
                fit_frequency_groups,
                inputs=["primary_train", "feature_encoder", "params:domains"],
                outputs="frequency_groups",
                name="fit_frequency_groups",
            ),
            node(
                assign_domains,
                inputs=[
                    "domain_encoder", "base_feature_spec", "frequency_groups", "params:domains",
                    "primary_train", "primary_valid", "primary_test",
                    "encoded_train", "encoded_valid", "encoded_test",
                ],
                outputs=["model_input_train", "model_input_valid", "model_input_test", "feature_spec", "domain_stats"],
                name="assign_domains",
            ),
        ]
    )
