"""The training loop: packing, fused log-probs, accumulation, data parallelism, resume, bad input."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import TrainConfig
from pipeline.model.batches import Example, StepTotals, collate_packed, collate_padded, plan_step, step_order
from pipeline.model.scoring import TokenScorer, gft_objective, sft_objective
from pipeline.model.loop import fit
from pipeline.model.trainer import NonFiniteError, accumulate_gradients, make_trainer, save_model, train_step
from tests.conftest import PAD, random_examples, tiny_lm

ROOT = Path(__file__).resolve().parents[2]


def _score(scorer, batch):
    return scorer(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                  targets=batch.targets, loss_mask=batch.loss_mask)[0]


def _reference_logprobs(model, examples, indices):
    """One example at a time, no padding, full logits: the plainest possible computation."""
    out = []
    for i in indices:
        ex = examples[i]
        ids = torch.tensor([list(ex.prompt_ids) + list(ex.response_ids)])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        out.append(logp.gather(-1, tgt[:, None]).squeeze(-1)[-len(ex.response_ids):])
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_padded_packed_fused_and_logits_paths_agree(kind):
    model = tiny_lm(kind, dtype=torch.float64)
    examples = random_examples(7, seed=1)
    idx = list(range(7))
    ref = _reference_logprobs(model, examples, idx)
    padded, packed = collate_padded(examples, idx, PAD), collate_packed(examples, idx, PAD, max_tokens=30)
    assert len(packed) > 1 and all(b.input_ids.shape[0] == 1 for b in packed)
    assert (padded.input_ids == PAD).any()  # the padded batch does have pad positions
    for fused in (True, False):
        scorer = TokenScorer(model, chunk_size=5, fused=fused)
        assert_close(_score(scorer, padded), ref, rtol=1e-10, atol=1e-10)
        assert_close(torch.cat([_score(scorer, b) for b in packed]), ref, rtol=1e-10, atol=1e-10)


def _grads(model, examples, cfg):
    trainer = make_trainer(model, cfg, total_steps=1)
    idx = step_order(len(examples), 0, cfg.sequences_per_step, cfg.seed)
    micro, totals = plan_step(examples, idx, cfg, rank=0, world=1, pad_id=PAD)
    accumulate_gradients(trainer, micro, gft_objective(tau=0.5), totals, step=0)
    return [p.grad.clone() for p in trainer.model.parameters()], len(micro)


def test_one_batch_of_8_equals_4_micro_batches_of_2_and_packing():
    examples = random_examples(8, seed=3, per_token=True)
    base = TrainConfig(sequences_per_step=8, micro_batch_size=8, precision="fp32")
    g8, n8 = _grads(tiny_lm(dtype=torch.float64), examples, base)
    g2, n2 = _grads(tiny_lm(dtype=torch.float64), examples, base.model_copy(update={"micro_batch_size": 2}))
    gp, np_ = _grads(tiny_lm(dtype=torch.float64), examples,
                     base.model_copy(update={"packing": True, "micro_batch_tokens": 20}))
    assert (n8, n2) == (1, 4) and np_ > 1
    for a, b, c in zip(g8, g2, gp):
        scale = a.abs().max().clamp_min(1e-30)
        assert ((a - b).abs().max() / scale) < 1e-6
        assert ((a - c).abs().max() / scale) < 1e-6
    assert any(g.abs().sum() > 0 for g in g8)


def test_gradient_checkpointing_gives_the_same_gradients():
    examples = random_examples(4, seed=2)
    cfg = TrainConfig(sequences_per_step=4, micro_batch_size=4, precision="fp32")
    plain, _ = _grads(tiny_lm(dtype=torch.float64), examples, cfg)
    ckpt, _ = _grads(tiny_lm(dtype=torch.float64), examples, cfg.model_copy(update={"gradient_checkpointing": True}))
    for a, b in zip(plain, ckpt):
        assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_sft_fit_learns_a_fixed_mapping():
    # Two fixed prompt -> response pairs: the NLL must fall well below its start.
    examples = [Example([5, 6, 7], [10, 11, 12, 2]), Example([8, 9], [20, 21, 2])] * 4
    cfg = TrainConfig(lr=3e-2, num_steps=25, sequences_per_step=8, micro_batch_size=4)
    result = fit(tiny_lm(), examples, sft_objective(), cfg, pad_id=PAD, progress_bar=False)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < 0.3 * first, (first, last)
    assert result.history[0]["lr"] == pytest.approx(3e-2)


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(lr=1.0, num_steps=6, warmup_steps=2, schedule="cosine", sequences_per_step=2,
                      micro_batch_size=2)
    result = fit(tiny_lm(), random_examples(4), sft_objective(), cfg, pad_id=PAD, progress_bar=False)
    lrs = [h["lr"] for h in result.history]
    # warmup 0, 0.5, then cosine from 1 over the remaining 4 steps: 1, cos^2-shaped 0.854, 0.5, 0.146
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.853553, 0.5, 0.146447], abs=1e-5)


def test_resume_is_exact(tmp_path):
    # 2N straight against N, a stop, and N resumed (with dropout, so the RNG state matters too).
    examples = random_examples(20, seed=4)
    cfg = TrainConfig(lr=5e-3, num_steps=6, sequences_per_step=4, micro_batch_size=2, schedule="cosine",
                      warmup_steps=2, seed=3, precision="fp32")
    objective = gft_objective(tau=0.5)
    straight = fit(tiny_lm(dropout=0.3), examples, objective, cfg, pad_id=PAD, progress_bar=False)
    ckpt = tmp_path / "ckpt"
    first = fit(tiny_lm(dropout=0.3), examples, objective, cfg, pad_id=PAD, checkpoint_dir=ckpt,
                stop_at_step=3, progress_bar=False)
    assert first.checkpoint.name == "step-00000003" and len(first.history) == 3
    resumed = fit(tiny_lm(seed=99, dropout=0.3), examples, objective, cfg, pad_id=PAD, checkpoint_dir=ckpt,
                  progress_bar=False)
    assert [h["step"] for h in resumed.history] == [4.0, 5.0, 6.0]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    for (name, a), b in zip(straight.trainer.model.state_dict().items(), resumed.trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000006"]  # keep_checkpoints=1, no temp folders


def test_save_model_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(lr=1e-2, num_steps=2, sequences_per_step=4, micro_batch_size=4)
    result = fit(tiny_lm(), random_examples(8), sft_objective(), cfg, pad_id=PAD, progress_bar=False)
    path = save_model(result.trainer, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for a, b in zip(result.trainer.model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_saved_tokenizer_does_not_record_how_it_was_loaded(tmp_path, monkeypatch):
    """Same training, same bytes online and offline: HF_HUB_OFFLINE made transformers save local_files_only=true in
    tokenizer_config.json, so an offline and an online run of one key wrote different model/ folders."""
    import huggingface_hub.constants

    from pipeline.data import chat
    from pipeline.data.synthetic import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "source")
    cfg = TrainConfig(lr=1e-2, num_steps=1, sequences_per_step=4, micro_batch_size=4)
    result = fit(tiny_lm(), random_examples(4), sft_objective(), cfg, pad_id=PAD, progress_bar=False)
    saved = {}
    for offline in (True, False):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        tok = chat.load_tokenizer(tmp_path / "source")
        assert tok.init_kwargs.get("local_files_only") is offline  # how it was loaded: not what it is
        out = save_model(result.trainer, tmp_path / f"offline-{offline}", tok)
        saved[offline] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        assert tok.init_kwargs.get("local_files_only") is offline  # the live tokenizer is left as it was
    assert saved[True] == saved[False]


def test_nan_logits_name_the_step_and_rows():
    model = tiny_lm("llama")  # untied: a NaN input embedding must not also poison the output projection
    bad_token = 40
    with torch.no_grad():
        model.get_input_embeddings().weight[bad_token] = float("nan")
    examples = [Example([3, 4], [5, 6])] * 6 + [Example([bad_token, 4], [5, 6]), Example([3, 4], [5, 6])]
    cfg = TrainConfig(num_steps=1, sequences_per_step=8, micro_batch_size=8)
    with pytest.raises(NonFiniteError, match=r"step 0: non-finite log-probs in example rows \[6\]"):
        fit(model, examples, sft_objective(), cfg, pad_id=PAD, progress_bar=False)


def test_nan_loss_names_the_rows():
    def bad_objective(scored, totals):
        out = sft_objective()(scored, totals)
        return type(out)(loss=out.loss * float("nan"), metrics=out.metrics)

    cfg = TrainConfig(num_steps=1, sequences_per_step=2, micro_batch_size=2)
    with pytest.raises(NonFiniteError, match=r"step 0: non-finite loss in example rows \[0, 1\]"):
        fit(tiny_lm(), random_examples(2), bad_objective, cfg, pad_id=PAD, progress_bar=False)


def _nan_loss_in_row_5(scored, totals):
    out = sft_objective()(scored, totals)
    poison = torch.where((scored.rows == 5).any(), float("nan"), 0.0)  # a NaN loss with finite gradients
    return type(out)(loss=out.loss + poison, metrics=out.metrics)


@pytest.mark.parametrize("what", ["log-probs", "loss"])
def test_nan_in_a_later_micro_batch_is_named_and_nothing_is_updated(what):
    # The finite checks are read once per step, after every micro-batch's backward: the error still names the
    # step and the rows of the bad micro-batch (the third of four), the weights are untouched and the
    # gradients are cleared. A NaN loss is caught even when the gradients stay finite.
    model, bad_token = tiny_lm("llama"), 40
    if what == "log-probs":
        with torch.no_grad():
            model.get_input_embeddings().weight[bad_token] = float("nan")
    examples = [Example([3, 4], [5, 6])] * 5 + [Example([bad_token, 4], [5, 6])] + [Example([3, 4], [5, 6])] * 2
    cfg = TrainConfig(lr=1e-2, sequences_per_step=8, micro_batch_size=2)
    trainer = make_trainer(model, cfg, total_steps=1)
    micro, totals = plan_step(examples, list(range(8)), cfg, rank=0, world=1, pad_id=PAD)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    objective, rows = (sft_objective(), "[5]") if what == "log-probs" else (_nan_loss_in_row_5, "[4, 5]")
    with pytest.raises(NonFiniteError, match=re.escape(f"step 3: non-finite {what} in example rows {rows}")):
        train_step(trainer, micro, objective, totals, max_grad_norm=1.0, step=3)
    assert len(micro) == 4 and all(p.grad is None for p in trainer.model.parameters())
    for k, v in trainer.model.state_dict().items():
        assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("example,message", [
    (Example([1], []), "example 1: field 'response_ids' is empty"),
    (Example([], [3]), "example 1: field 'prompt_ids' is empty"),
    (Example([1], [3, 4], [0.5]), "example 1: field 'advantage' has 1 values for 2 response tokens"),
    (Example([1], [3], float("nan")), "example 1: field 'advantage' holds a NaN"),
])
def test_bad_examples_are_named(example, message):
    cfg = TrainConfig(num_steps=1, sequences_per_step=2, micro_batch_size=2)
    with pytest.raises(ValueError, match=message):
        fit(tiny_lm(), [Example([1], [3]), example], sft_objective(), cfg, pad_id=PAD, progress_bar=False)


def test_step_plan_totals_are_global():
    examples = random_examples(10, seed=8)
    cfg = TrainConfig(sequences_per_step=6, micro_batch_size=2)
    idx = step_order(10, 0, 6, 0)
    parts = [plan_step(examples, idx, cfg, rank=r, world=2, pad_id=PAD) for r in (0, 1)]
    want = StepTotals(tokens=sum(len(examples[i].response_ids) for i in idx), sequences=6)
    assert parts[0][1] == parts[1][1] == want
    assert sum(b.num_tokens for p in parts for b in p[0]) == want.tokens
    # every example appears once per epoch, in a seed-dependent order
    epoch = sum((step_order(10, s, 5, 0) for s in range(2)), [])
    assert sorted(epoch) == list(range(10)) and epoch != step_order(10, 0, 10, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_two_processes_equal_one(tmp_path, packing):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(ROOT / "tests/dist_worker.py"), str(one), packing], check=True, env=env,
                   timeout=300)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                    str(_free_port()), str(ROOT / "tests/dist_worker.py"), str(two), packing],
                   check=True, env=env, timeout=300)
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    for name, p in a["params"].items():
        assert_close(b["params"][name], p, rtol=1e-10, atol=1e-12, msg=name)
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-10)
    assert a["params"]["model.embed_tokens.weight"].ne(tiny_lm(dtype=torch.float64).model.embed_tokens.weight).any()


def test_trainers_of_different_precision_in_one_process():
    # accelerate keeps one process-wide state; a stage at bf16 after one at fp32 must still work.
    for precision in ("fp32", "bf16", "auto"):
        cfg = TrainConfig(num_steps=1, sequences_per_step=2, micro_batch_size=2, precision=precision)
        result = fit(tiny_lm(), random_examples(2), sft_objective(), cfg, pad_id=PAD, progress_bar=False)
        assert result.trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16" or (
            precision == "auto" and torch.cuda.is_available()) else "no")


@pytest.mark.parametrize("equal", [True, False])
def test_full_padded_micro_batch_passes_neither_mask_nor_positions(equal, monkeypatch):
    """Rows of equal length: the padded micro-batch's mask is all ones and its positions 0..L-1, so the model gets
    neither (its causal default, SDPA's fast path); uneven rows keep both. Log-probs equal the reference."""
    from pipeline.model.trainer import _score

    examples = random_examples(6, seed=3)
    if equal:
        examples = [Example(list(ex.prompt_ids[:1]) * 3, [5, 6, 7, 8], ex.advantage) for ex in examples]
    model = tiny_lm(dtype=torch.float64)
    trainer = make_trainer(model, TrainConfig(lr=1e-3, sequences_per_step=6, micro_batch_size=6), total_steps=1)
    seen = []
    real = TokenScorer.forward

    def spy(self, input_ids, position_ids, attention_mask, *args, **kw):
        seen.append((position_ids, attention_mask))
        return real(self, input_ids, position_ids, attention_mask, *args, **kw)

    monkeypatch.setattr(TokenScorer, "forward", spy)
    scored = _score(trainer, collate_padded(examples, list(range(6)), PAD))
    assert (seen[0][0] is None and seen[0][1] is None) == equal
    assert_close(scored.logprobs.detach(), _reference_logprobs(model, examples, range(6)), rtol=1e-10, atol=1e-10)
