"""Runs the SFT stage of tests/integration/test_stages_failures.py in its own process, so a test can kill it mid-write."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from pipeline import runtime, stages  # noqa: E402
from pipeline.store.artifacts import ArtifactRef, StageStore  # noqa: E402
from tests.integration.test_stages_failures import LONG_SFT  # noqa: E402

if __name__ == "__main__":
    root, prompts, base = sys.argv[1], ArtifactRef.model_validate_json(sys.argv[2]), ArtifactRef.model_validate_json(
        sys.argv[3])
    res = runtime.Resources(StageStore(Path(root)), progress=False)
    stages.sft(LONG_SFT, prompts, None, base, res=res)
