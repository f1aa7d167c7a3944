"""training: one namespaced copy per variant (``<variant>.trained_model`` etc.).

Each copy reads the shared model input and feature spec, ``params:training`` and its
own ``params:variants.<variant>``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.variants import variant_names

from .nodes import train_variant

SHARED_INPUTS = {"model_input_train", "model_input_valid", "feature_spec"}


def variant_pipeline(name: str) -> Pipeline:
    func = update_wrapper(partial(train_variant, variant_name=name), train_variant)
    base = Pipeline(
        [
            node(
                func,
                inputs=["model_input_train", "model_input_valid", "feature_spec", "params:training", "params:variant"],
                outputs=["trained_model", "tuning_summary", "study_trials", "training_history"],
                name="train_variant",
            )
        ]
    )
    return Pipeline(
        base,
        namespace=name,
        inputs=SHARED_INPUTS,
        parameters={"params:training": "params:training", "params:variant": f"params:variants.{name}"},
    )


def create_pipeline(**kwargs) -> Pipeline:
    return sum((variant_pipeline(name) for name in variant_names()), Pipeline([]))
