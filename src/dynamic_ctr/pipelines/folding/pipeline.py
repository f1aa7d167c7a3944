"""folding: ``<variant>.trained_model`` -> ``<variant>.folded_model`` + check; then the
deployable model (``deployed_model``) chosen among them."""

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.variants import per_variant_inputs, variant_names, variant_pipeline

from .nodes import fold_variant, select_deployment


def create_pipeline(**kwargs) -> Pipeline:
    names = variant_names()
    folds = [
        variant_pipeline(
            name,
            fold_variant,
            inputs=["trained_model", "model_input_test", "feature_spec", "params:folding"],
            outputs=["folded_model", "folding_check"],
            node_name="fold_variant",
            shared={"model_input_test", "feature_spec"},
            parameters={"params:folding": "params:folding"},
        )
        for name in names
    ]
    inputs = {"deployment": "params:deployment", **per_variant_inputs(names, {"folded": "folded_model", "summary": "tuning_summary"})}
    select = node(select_deployment, inputs=inputs, outputs=["deployed_model", "deployment_record"], name="select_deployment")
    return sum(folds, Pipeline([])) + Pipeline([select])
