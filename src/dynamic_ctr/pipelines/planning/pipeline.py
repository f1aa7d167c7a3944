"""planning: ``feature_spec`` + the suite's parameters -> ``<suite>.suite_plan``.

Every training node of the suite reads the plan, so no variant trains before every
variant has been checked.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.suite import suite_variant_names

from .nodes import plan_suite


def create_pipeline(suite: str, **kwargs) -> Pipeline:
    func = update_wrapper(partial(plan_suite, suite=suite, registered=suite_variant_names(suite)), plan_suite)
    return Pipeline(
        [node(func, inputs=["feature_spec", "params:training", "params:suite"], outputs="suite_plan", name="plan_suite")],
        namespace=suite,
        inputs={"feature_spec"},
        parameters={"params:training": "params:training", "params:suite": f"params:{suite}"},
    )
