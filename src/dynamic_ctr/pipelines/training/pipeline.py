"""training: one namespaced copy per variant (``<variant>.trained_model`` etc.).

Each copy reads the shared model input and feature spec, ``params:training`` and its
own ``params:variants.<variant>``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline

from dynamic_ctr.pipelines.variants import variant_names, variant_pipeline

from .nodes import train_variant


def create_pipeline(**kwargs) -> Pipeline:
    return sum(
        (
            variant_pipeline(
                name,
                update_wrapper(partial(train_variant, variant_name=name), train_variant),
                inputs=["model_input_train", "model_input_valid", "feature_spec", "params:training", "params:variant"],
                outputs=["trained_model", "tuning_summary", "study_trials", "training_history"],
                node_name="train_variant",
                shared={"model_input_train", "model_input_valid", "feature_spec"},
                parameters={"params:training": "params:training", "params:variant": f"params:variants.{name}"},
            )
            for name in variant_names()
        ),
        Pipeline([]),
    )
