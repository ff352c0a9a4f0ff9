"""Settings as pydantic models: frozen, extra="forbid", one docstring per field. Values live in TOML files.

One module per layer of the pipeline, each importable on its own; every name is also here:

- `base`: `Settings` (the digest of what ran, and the key digest of what changes the output);
- `training`: `TrainConfig`, `LaunchConfig` (the optimizer and where training runs);
- `rollout`: `SamplingConfig`, `EngineConfig` (how and with what completions are sampled);
- `data`: `DataConfig`, `ModelsConfig`, `SyntheticConfig` (what a run starts from);
- `stages`: `TeacherSampleConfig`, `SFTConfig`, `GFTConfig`, `GRPOConfig`, `EvalConfig` and its `BenchmarkConfig` (one per stage);
- `run`: `RunConfig`, `TrackingConfig`, `RetentionConfig` and loading (TOML, paths, overrides);
- `keys`: which fields enter a stage's key and which only change how the run goes;
- `renames`: old names, refused with the new one named.
"""

from pipeline.config.base import Settings
from pipeline.config.data import DataConfig, ModelsConfig, SyntheticConfig
from pipeline.config.rollout import EngineConfig, SamplingConfig
from pipeline.config.run import (
    RetentionConfig, RunConfig, TrackingConfig, apply_overrides, load_run_config, load_toml, resolve_paths,
)
from pipeline.config.stages import (
    HELDOUT, BenchmarkConfig, EvalConfig, GFTConfig, GRPOConfig, SFTConfig, TeacherSampleConfig,
)
from pipeline.config.training import LaunchConfig, TrainConfig

__all__ = ["Settings", "LaunchConfig", "TrainConfig", "SamplingConfig", "EngineConfig", "DataConfig", "ModelsConfig",
           "TeacherSampleConfig", "SFTConfig", "GFTConfig", "GRPOConfig", "HELDOUT", "BenchmarkConfig", "EvalConfig", "SyntheticConfig",
           "TrackingConfig", "RetentionConfig", "RunConfig", "load_toml", "load_run_config", "resolve_paths",
           "apply_overrides"]
