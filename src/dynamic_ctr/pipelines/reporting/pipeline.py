"""reporting: per variant, test metrics of the deployable (folded) models; then one
report (JSON summary, HTML, tables, figures) over all variants."""

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.variants import per_variant_inputs, variant_names, variant_pipeline

from .nodes import build_report, evaluate_variant

REPORT_INPUTS = {
    "metrics": "test_metrics", "folding": "folding_check", "summary": "tuning_summary",
    "history": "training_history", "projection": "cores_projection",
}


def create_pipeline(**kwargs) -> Pipeline:
    names = variant_names()
    evaluations = [
        variant_pipeline(
            name,
            evaluate_variant,
            inputs=["folded_model", "model_input_test", "feature_spec", "params:reporting"],
            outputs=["test_metrics", "cores_projection"],
            node_name="evaluate_variant",
            shared={"model_input_test", "feature_spec"},
            parameters={"params:reporting": "params:reporting"},
        )
        for name in names
    ]
    inputs = {
        "params": "params:reporting", "feature_spec": "feature_spec", "domain_stats": "domain_stats",
        "deployment": "deployment_record", **per_variant_inputs(names, REPORT_INPUTS),
    }
    report = node(
        build_report,
        inputs=inputs,
        outputs=["report_summary", "report_html", "paper_comparison", "efficiency_table", "per_domain_auc",
                 "frequency_gain_table", "frequency_gain_plot", "cores_pca_plot"],
        name="build_report",
    )
    return sum(evaluations, Pipeline([])) + Pipeline([report])
