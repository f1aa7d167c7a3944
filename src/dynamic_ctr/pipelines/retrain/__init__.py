"""Scheduled retraining: partitions, champion/challenger cycles, rollback."""

from .pipeline import create_partition_pipeline, create_pipeline, create_rollback_pipeline

__all__ = ["create_partition_pipeline", "create_pipeline", "create_rollback_pipeline"]
