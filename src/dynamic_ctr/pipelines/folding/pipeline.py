"""folding: ``<variant>.trained_model`` -> ``<variant>.folded_model`` + check for every
variant of a suite; then the suite's deployable model (``<suite>.deployed_model``)."""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.suite import per_variant_inputs, suite_variant_names, variant_pipeline

from .nodes import fold_variant, select_deployment


def create_pipeline(suite: str, **kwargs) -> Pipeline:
    names = suite_variant_names(suite)
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
    select = node(
        update_wrapper(partial(select_deployment, suite=suite), select_deployment), inputs=inputs, outputs=[f"{suite}.deployed_model", f"{suite}.deployment_record"],
        name=f"{suite}.select_deployment",
    )
    return sum(folds, Pipeline([])) + Pipeline([select])
