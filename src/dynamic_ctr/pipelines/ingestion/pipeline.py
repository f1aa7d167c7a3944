"""ingestion: raw_source -> clean_interactions (+ quarantine, schema, report) -> ingestion_check (the gate)."""

from kedro.pipeline import Pipeline, node

from .nodes import check_quarantine, ingest


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                ingest,
                inputs=["raw_source", "params:ingestion"],
                outputs=["clean_interactions", "ingestion_quarantine", "table_schema", "ingestion_report"],
                name="ingest",
            ),
            node(
                check_quarantine,
                inputs=["clean_interactions", "ingestion_report"],
                outputs="ingestion_check",
                name="check_quarantine",
            ),
        ]
    )
