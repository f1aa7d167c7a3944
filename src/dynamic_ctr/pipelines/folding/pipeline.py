"""folding: ``<variant>.trained_model`` -> ``<variant>.folded_model`` + check; then the
deployable model (``deployed_model``) chosen among them."""

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.variants import variant_names

from .nodes import fold_variant, select_deployment


def variant_pipeline(name: str) -> Pipeline:
    base = Pipeline(
        [
            node(
                fold_variant,
                inputs=["trained_model", "model_input_test", "feature_spec", "params:folding"],
                outputs=["folded_model", "folding_check"],
                name="fold_variant",
            )
        ]
    )
    return Pipeline(
        base,
        namespace=name,
        inputs={"model_input_test", "feature_spec"},
        parameters={"params:folding": "params:folding"},
    )


def create_pipeline(**kwargs) -> Pipeline:
    names = variant_names()
    inputs = {"deployment": "params:deployment"}
    for name in names:
        inputs[f"{name}__folded"] = f"{name}.folded_model"
        inputs[f"{name}__summary"] = f"{name}.tuning_summary"
    select = Pipeline(
        [node(select_deployment, inputs=inputs, outputs=["deployed_model", "deployment_record"], name="select_deployment")]
    )
    return sum((variant_pipeline(n) for n in names), Pipeline([])) + select
