"""The streaming data pipeline (``stream_data``)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
