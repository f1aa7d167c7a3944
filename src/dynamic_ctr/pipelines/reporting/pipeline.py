"""reporting: per variant, test metrics of the deployable (folded) models; then one
report (JSON summary, HTML, tables, figures) over all variants."""

from kedro.pipeline import Pipeline, node

from dynamic_ctr.pipelines.variants import variant_names

from .nodes import build_report, evaluate_variant


def variant_pipeline(name: str) -> Pipeline:
    base = Pipeline(
        [
            node(
                evaluate_variant,
                inputs=["folded_model", "model_input_test", "feature_spec", "params:reporting"],
                outputs=["test_metrics", "cores_projection"],
                name="evaluate_variant",
            )
        ]
    )
    return Pipeline(base, namespace=name, inputs={"model_input_test", "feature_spec"}, parameters={"params:reporting": "params:reporting"})


def create_pipeline(**kwargs) -> Pipeline:
    names = variant_names()
    inputs = {"params": "params:reporting", "feature_spec": "feature_spec", "domain_stats": "domain_stats", "deployment": "deployment_record"}
    for name in names:
        for kind, dataset in (("metrics", "test_metrics"), ("folding", "folding_check"), ("summary", "tuning_summary"),
                              ("history", "training_history"), ("projection", "cores_projection")):
            inputs[f"{name}__{kind}"] = f"{name}.{dataset}"
    report = node(
        build_report,
        inputs=inputs,
        outputs=["report_summary", "report_html", "paper_comparison", "efficiency_table", "per_domain_auc", "frequency_gain_table", "frequency_gain_plot", "cores_pca_plot"],
        name="build_report",
    )
    return sum((variant_pipeline(n) for n in names), Pipeline([])) + Pipeline([report])
