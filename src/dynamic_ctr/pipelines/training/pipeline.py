"""training: one namespaced copy per variant of a suite (``<variant>.trained_model`` etc.).

Each copy reads the shared model input, the feature spec and the suite's plan
(``<suite>.suite_plan``), so it starts only once every variant has been checked.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline

from dynamic_ctr.pipelines.suite import suite_variant_names, variant_pipeline

from .nodes import train_variant


def create_pipeline(suite: str, **kwargs) -> Pipeline:
    plan = f"{suite}.suite_plan"
    return sum(
        (
            variant_pipeline(
                name,
                update_wrapper(partial(train_variant, variant_name=name), train_variant),
                inputs=["model_input_train", "model_input_valid", "feature_spec", plan, "params:training.device"],
                outputs=["trained_model", "tuning_summary", "study_trials", "training_history"],
                node_name="train_variant",
                shared={"model_input_train", "model_input_valid", "feature_spec", plan},
                parameters={"params:training.device": "params:training.device"},
            )
            for name in suite_variant_names(suite)
        ),
        Pipeline([]),
    )
