"""The scoring pipelines (the retraining champion, or a suite's deployed model)."""

from .pipeline import create_pipeline, create_suite_pipeline

__all__ = ["create_pipeline", "create_suite_pipeline"]
