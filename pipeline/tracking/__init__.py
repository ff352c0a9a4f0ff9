"""Experiment tracking: the `Tracker` protocol the stages call, a null tracker, and the MLflow tracker (its runs,
lineage and registry in sibling modules)."""

from pipeline.tracking.base import Inputs, NullTracker, StageRun, Tracker, sqlite_uri, ui_address
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.runs import experiment_addresses, metric_name

__all__ = ["Tracker", "StageRun", "Inputs", "NullTracker", "MlflowTracker", "sqlite_uri", "ui_address",
           "experiment_addresses", "metric_name"]
