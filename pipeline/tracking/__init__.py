"""Experiment tracking: the `Tracker` protocol the stages call, a null tracker, and the MLflow tracker."""

from pipeline.tracking.mlflow_tracker import MlflowTracker, NullTracker, StageRun, Tracker, sqlite_uri

__all__ = ["Tracker", "StageRun", "NullTracker", "MlflowTracker", "sqlite_uri"]
