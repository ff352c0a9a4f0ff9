"""gft-pipeline: the library. Every stage of SFT -> GFT -> GRPO -> evaluation as plain Python calls."""

import os

__version__ = "0.1.0"

# MLflow sends usage telemetry unless told not to; a pipeline run reports nothing unless its user opts in
# (MLFLOW_DISABLE_TELEMETRY=false). Set before anything imports mlflow; inherited by `gft ui`'s server.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
