"""reporting: per variant, test metrics and predictions of the deployable (folded)
models; then the suite's report (JSON summary, HTML, comparison, tables, figures)."""

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.suite import per_variant_inputs, suite_variant_names, variant_pipeline

from .nodes import build_report, evaluate_variant

REPORT_INPUTS = {
    "metrics": "test_metrics", "predictions": "test_predictions", "folding": "folding_check",
    "summary": "tuning_summary", "history": "training_history", "projection": "cores_projection",
    "trials": "study_trials", "trained": "trained_model",
}
REPORT_OUTPUTS = ("report_summary", "report_html", "paper_comparison", "model_tables", "efficiency_table", "per_domain_auc",
                  "frequency_gain_table", "frequency_gain_plot", "cores_pca_plot", "hyperparameter_study_plot",
                  "kernel_spectrum_plot", "domain_gain_table", "domain_gain_plot", "domain_masks_plot", "sweep_plot")


def create_pipeline(suite: str, **kwargs) -> Pipeline:
    names = suite_variant_names(suite)
    evaluations = [
        variant_pipeline(
            name,
            evaluate_variant,
            inputs=["folded_model", "model_input_test", "feature_spec", "params:reporting"],
            outputs=["test_metrics", "test_predictions", "cores_projection"],
            node_name="evaluate_variant",
            shared={"model_input_test", "feature_spec"},
            parameters={"params:reporting": "params:reporting"},
        )
        for name in names
    ]
    inputs = {
        "params": "params:reporting", "plan": f"{suite}.suite_plan", "feature_spec": "feature_spec",
        "domain_stats": "domain_stats", "deployment": f"{suite}.deployment_record", **per_variant_inputs(names, REPORT_INPUTS),
    }
    report = node(build_report, inputs=inputs, outputs=[f"{suite}.{o}" for o in REPORT_OUTPUTS], name=f"{suite}.build_report")
    return sum(evaluations, Pipeline([])) + Pipeline([report])
