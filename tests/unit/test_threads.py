"""`run.threads` (torch's intra-op thread count) is classified OUTPUT in pipeline/config/keys.py: a float reduction
is split across threads, so its rounding depends on their number. The first test shows that on this torch; the
second that every stage that computes with torch has the thread count in its key (a `threads` argument, which
`runtime.execute` sets around the stage and a launched job sets in each process)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_stage_keys import _calls

TORCH_STAGES = {"bootstrap_models", "teacher_sample", "sft", "gft_round", "grpo_round", "evaluate"}
"""The stages whose outputs come from torch arithmetic (prepare_data only reads and splits rows)."""


def test_threads_can_change_a_float_sum():
    values = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))  # [1M] float32
    before = torch.get_num_threads()
    try:
        sums = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums[threads] = values.sum()
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(sums[1], sums[2]), "1 and 2 threads summed 1M floats bit for bit alike"
    assert torch.allclose(sums[1], sums[2])  # the same sum, rounded another way


def test_run_threads_is_in_the_key_of_every_stage_that_computes_with_torch(tmp_path):
    one, two = _calls(tmp_path / "one"), _calls(tmp_path / "two", threads=2)
    assert [c.stage for c in one] == [c.stage for c in two]
    torch_calls = [(a, b) for a, b in zip(one, two, strict=True) if a.stage in TORCH_STAGES]
    assert {a.stage for a, _ in torch_calls} >= {"bootstrap_models", "teacher_sample", "sft", "gft_round", "evaluate"}
    same = [a.stage for a, b in torch_calls if a.spec.arguments_digest == b.spec.arguments_digest]
    assert not same, f"run.threads = 1 and 2 give these stages the same key: {same}"
