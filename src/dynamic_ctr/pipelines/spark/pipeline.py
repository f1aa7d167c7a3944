"""spark_data: raw Criteo text -> clean rows (+ quarantine) -> hash split -> encoder -> encoded splits, on Spark.

The Spark twin of ``ingestion`` + ``features`` for row-local formats (Criteo). It writes
the artifacts those pipelines write, under the same names and paths, so the pipelines
downstream (``domains``, training) read them as they read the in-memory ones.
"""

from kedro.pipeline import Pipeline, node

from .nodes import (
    check_ingestion,
    encode_splits_spark,
    fit_encoder_spark,
    ingest_lines,
    split_rows,
    start_spark,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(start_spark, inputs="params:spark", outputs="spark_session", name="start_spark"),
            node(
                ingest_lines,
                inputs=["spark_session", "spark_raw_lines", "params:ingestion"],
                outputs=["spark_clean_interactions", "spark_ingestion_quarantine", "table_schema", "ingestion_report"],
                name="spark_ingest",
            ),
            node(check_ingestion, inputs="ingestion_report", outputs="ingestion_check", name="spark_check_quarantine"),
            node(
                split_rows,
                inputs=["spark_clean_interactions", "table_schema", "ingestion_check", "params:features.split"],
                outputs=["spark_primary_train", "spark_primary_valid", "spark_primary_test", "split_summary"],
                name="spark_split",
            ),
            node(
                fit_encoder_spark,
                inputs=["spark_primary_train", "table_schema", "params:features.encoder", "params:features.roles"],
                outputs=["feature_encoder", "base_feature_spec"],
                name="spark_fit_encoder",
            ),
            node(
                encode_splits_spark,
                inputs=["feature_encoder", "spark_primary_train", "spark_primary_valid", "spark_primary_test"],
                outputs=["spark_encoded_train", "spark_encoded_valid", "spark_encoded_test", "encoding_report"],
                name="spark_encode",
            ),
        ]
    )
