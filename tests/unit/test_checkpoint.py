"""Work checkpoints inside every guarantee: verified before they are read, discarded when damaged, never
unpickled, carrying the history so a resume publishes all of it, and removed once the stage's output exists."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.model.checkpoint import DIGESTS, StateError, _sha, checkpoints, load_state, save_state
from pipeline.model.loop import fit
from pipeline.model.scoring import sft_objective
from pipeline.model.trainer import make_trainer
from tests.conftest import PAD, random_examples, tiny_lm

CFG = TrainConfig(lr=1e-3, num_steps=6, sequences_per_step=4, micro_batch_size=4, save_every=1, keep_checkpoints=3)
EXAMPLES = random_examples(12, seed=2)


def _fit(root: Path, **kw):
    return fit(tiny_lm(seed=1), EXAMPLES, sft_objective(), CFG, pad_id=PAD, checkpoint_dir=root, progress_bar=False,
               **kw)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_after_the_last_checkpoint_keeps_the_whole_history(tmp_path):
    """Killed after the last checkpoint, before publishing: the rerun takes no step, and its history is still
    every step's (it used to be empty, and the stage published a NaN final loss)."""
    first = _fit(tmp_path)
    again = _fit(tmp_path)
    assert again.history == [] and len(again.full_history) == CFG.num_steps
    assert again.full_history == first.full_history == first.history
    assert torch.isfinite(torch.tensor(again.full_history[-1]["loss"]))


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    whole = _fit(tmp_path / "a")
    _fit(tmp_path / "b", stop_at_step=3)
    resumed = _fit(tmp_path / "b")
    assert len(resumed.history) == 3 and resumed.full_history == whole.full_history
    for name, p in _params(whole.trainer.model).items():
        assert torch.equal(p, _params(resumed.trainer.model)[name]), name


def test_a_damaged_checkpoint_is_discarded_and_the_next_older_one_resumes(tmp_path, caplog):
    _fit(tmp_path, stop_at_step=3)
    newest = checkpoints(tmp_path)[-1]
    blob = bytearray((newest / "optimizer.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    (newest / "optimizer.pt").write_bytes(bytes(blob))
    resumed = _fit(tmp_path)
    assert "discarding checkpoint" in caplog.text and "step-00000003" in caplog.text
    assert len(resumed.history) == 4  # from step 2, the older checkpoint
    assert resumed.full_history == _fit(tmp_path / "clean").full_history


def test_a_planted_pickle_is_never_run_even_with_matching_digests(tmp_path):
    """Someone replaces optimizer.pt with a pickle that runs code, and rewrites digests.json to match: loading
    reads tensors and plain containers only, so the code does not run and the checkpoint is discarded."""
    _fit(tmp_path, stop_at_step=2)
    newest = checkpoints(tmp_path)[-1]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (newest / "optimizer.pt").write_bytes(pickle.dumps({"state": Payload()}))
    digests = json.loads((newest / DIGESTS).read_text())
    digests["optimizer.pt"] = _sha(newest / "optimizer.pt")
    (newest / DIGESTS).write_text(json.dumps(digests))
    resumed = _fit(tmp_path)
    assert not marker.exists()
    assert len(resumed.history) == CFG.num_steps - 1  # resumed from step 1, the older checkpoint


def test_load_state_refuses_a_folder_without_digests_or_with_an_extra_file(tmp_path):
    trainer = make_trainer(tiny_lm(), CFG, total_steps=1)
    save_state(trainer, tmp_path / "s")
    (tmp_path / "s" / "extra.pt").write_bytes(b"x")
    with pytest.raises(StateError, match="extra.pt"):
        load_state(trainer, tmp_path / "s")
    (tmp_path / "s" / DIGESTS).unlink()
    with pytest.raises(StateError, match="no digests.json"):
        load_state(trainer, tmp_path / "s")


def test_a_stage_removes_its_work_folder_once_its_output_exists(tmp_path):
    """Checkpoints left by a killed run are removed when the stage is published, or served by another run."""
    from pipeline.runtime import Resources, cached
    from pipeline.store.artifacts import StageStore
    from pipeline.store.cache import derive_spec

    res = Resources(StageStore(tmp_path), progress=False)
    spec = derive_spec("sft", "model", {"cfg": CFG})
    leftover = res.store.work_dir("sft", spec.key)
    (leftover / "step-00000001").mkdir(parents=True)

    def build(out: Path, key: str) -> dict[str, float]:
        (out / "model").mkdir()
        (out / "model" / "w.txt").write_text("weights")
        return {}

    cached(res, spec, build)
    assert not leftover.exists()
    (leftover / "step-00000002").mkdir(parents=True)  # another run killed meanwhile
    cached(res, spec, build)  # served
    assert not leftover.exists() and res.calls == {"sft": 1}
