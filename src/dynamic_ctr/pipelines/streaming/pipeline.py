"""stream_data: raw_stream -> checked, split parts -> encoders from counts -> model inputs.

Writes the datasets the ``ingestion``, ``features`` and ``domains`` pipelines write for
the suites (``model_input_{split}``, ``feature_spec``, encoders, reports), holding one
batch of the log in memory at a time; the streamed clean rows are ``stream_primary_*``.
"""

from kedro.pipeline import Pipeline, node

from .nodes import (
    SPLITS,
    encode_stream,
    find_duplicates,
    fit_stream,
    ingest_stream,
    quarantine_duplicates_stream,
    summarise_encoding,
    summarise_ingestion,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                ingest_stream,
                inputs=["raw_stream", "params:ingestion", "params:features.split", "params:features.encoder", "params:domains"],
                outputs=[*(f"stream_primary_{s}" for s in SPLITS), "stream_quarantine", "stream_batches", "stream_keys"],
                name="ingest_stream",
            ),
            node(find_duplicates, inputs=["stream_keys", "params:ingestion"], outputs="stream_duplicates", name="find_duplicates"),
            node(
                quarantine_duplicates_stream,
                inputs=["stream_duplicates", "stream_batches", *(f"stream_primary_{s}" for s in SPLITS)],
                outputs="stream_quarantine_duplicates",
                name="quarantine_duplicates_stream",
            ),
            node(
                summarise_ingestion,
                inputs=["stream_batches", "stream_duplicates", "params:ingestion", "params:features.split"],
                outputs=["table_schema", "ingestion_report", "ingestion_check", "split_summary"],
                name="summarise_ingestion",
            ),
            node(
                fit_stream,
                inputs=["stream_primary_train", "stream_duplicates", "table_schema", "ingestion_check", "params:features.encoder",
                        "params:features.roles", "params:domains"],
                outputs=["feature_encoder", "base_feature_spec", "domain_encoder", "frequency_groups"],
                name="fit_stream",
            ),
            *(
                node(
                    encode_stream,
                    inputs=["feature_encoder", "domain_encoder", "frequency_groups", f"stream_primary_{s}", "stream_duplicates"],
                    outputs=[f"model_input_{s}", f"stream_encoding_{s}"],
                    name=f"encode_stream_{s}",
                )
                for s in SPLITS
            ),
            node(
                summarise_encoding,
                inputs=["base_feature_spec", "domain_encoder", *(f"stream_encoding_{s}" for s in SPLITS)],
                outputs=["encoding_report", "feature_spec", "domain_stats"],
                name="summarise_encoding",
            ),
        ]
    )
