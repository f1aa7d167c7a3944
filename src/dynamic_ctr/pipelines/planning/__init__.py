"""The planning pipeline: one suite's variants resolved and checked against the data."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
