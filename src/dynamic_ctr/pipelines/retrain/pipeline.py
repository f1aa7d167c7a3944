"""retrain: one champion/challenger cycle per run (see ``nodes``).

- ``partition_log``: cut the shipped log (``raw_source``) into weekly raw partitions;
- ``retrain``: one cycle on the newest partition of ``retrain_partitions``;
- ``rollback``: make an earlier champion current again
  (``--load-versions retrain.rollback_target:<version>``).

The champion is read as ``retrain.champion_current`` and written as
``retrain.champion``: two catalog names of one versioned folder, because a Kedro
pipeline may not read and write one dataset.
"""

from kedro.pipeline import Pipeline, node

from .nodes import (
    crown,
    decide,
    drift_report,
    encode_cycle,
    load_cycle,
    partition_log,
    roll_back,
    train_challengers,
)


def create_partition_pipeline(**kwargs) -> Pipeline:
    return Pipeline([node(partition_log, inputs=["raw_source", "params:retrain"], outputs="retrain_partitions", name="partition_log")])


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                load_cycle,
                inputs=["retrain_partitions", "retrain_side_tables", "retrain.champion_current", "params:ingestion", "params:retrain"],
                outputs=["retrain.window", "retrain.holdout", "retrain.quarantine", "retrain.cycle"],
                name="load_cycle",
            ),
            node(
                encode_cycle,
                inputs=["retrain.champion_current", "retrain.window", "retrain.holdout", "retrain.cycle", "params:features", "params:domains", "params:retrain"],
                outputs=["retrain.inputs", "retrain.encoders", "retrain.encoding_report"],
                name="encode_cycle",
            ),
            node(
                train_challengers,
                inputs=["retrain.champion_current", "retrain.inputs", "retrain.encoders", "retrain.cycle", "params:training", "parameters", "params:retrain"],
                outputs=["retrain.challengers", "retrain.training_record"],
                name="train_challengers",
            ),
            node(
                decide,
                inputs=["retrain.champion_current", "retrain.challengers", "retrain.inputs", "retrain.encoders", "retrain.cycle", "retrain.encoding_report", "retrain.training_record", "params:retrain"],
                outputs="retrain.promotion_record",
                name="decide",
            ),
            node(
                crown,
                inputs=["retrain.champion_current", "retrain.challengers", "retrain.encoders", "retrain.promotion_record", "params:retrain"],
                outputs="retrain.champion",
                name="crown",
            ),
            node(
                drift_report,
                inputs=["retrain.champion_current", "retrain.window", "retrain.holdout", "retrain.champion", "retrain.promotion_record"],
                outputs=["retrain.drift_table", "retrain.auc_trend_plot", "retrain.report_html"],
                name="drift_report",
            ),
        ]
    )


def create_rollback_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [node(roll_back, inputs=["retrain.rollback_target", "retrain.champion_current"], outputs=["retrain.champion", "retrain.rollback_record"], name="roll_back")]
    )
