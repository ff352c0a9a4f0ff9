"""Trains a tiny float64 model for a few steps and saves its parameters; run alone or under torchrun."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.model.scoring import gft_objective  # noqa: E402
from pipeline.model.loop import fit  # noqa: E402
from tests.conftest import PAD, random_examples, tiny_lm  # noqa: E402


def main(out: str, packing: bool) -> None:
    model = tiny_lm("qwen2", seed=0, dtype=torch.float64)
    cfg = TrainConfig(lr=1e-2, num_steps=3, sequences_per_step=8, micro_batch_size=2, packing=packing,
                      micro_batch_tokens=24, schedule="cosine", warmup_steps=1)
    result = fit(model, random_examples(24, seed=5), gft_objective(tau=0.5), cfg, pad_id=PAD, progress_bar=False)
    acc = result.trainer.accelerator
    if acc.is_main_process:
        torch.save({"params": {k: v.detach().clone() for k, v in result.trainer.model.state_dict().items()},
                    "history": result.history, "world": acc.num_processes}, out)


if __name__ == "__main__":
    main(sys.argv[1], packing=len(sys.argv) > 2 and sys.argv[2] == "packed")
