"""The Spark data pipeline (``kedro run --env spark --pipeline spark_data``)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
