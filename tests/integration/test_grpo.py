"""GRPO rounds: combined rewards with None, masked advantages, and the round's own training path
(on-policy ratio exactly 1 and the advantage-weighted policy gradient; IS weights; later steps off-policy)."""

import copy
import math

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from pipeline.rounds import grpo
from pipeline.algo.advantages import combine_rewards, group_advantages, masked_group_advantages
from pipeline.config import GRPOConfig, TrainConfig
from pipeline.rounds.groups import Member
from pipeline.rollout.verifiers import Verifier, exact_match
from pipeline.model.trainer import make_trainer
from tests import reward_helpers
from tests.conftest import PAD, tiny_lm
from tests.reference import advantages_reference, combine_rewards_reference, importance_weights_reference

NAN = float("nan")


# --------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combine_rewards_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(12, 3, generator=g, dtype=torch.float64)
    missing = torch.rand(12, 3, generator=g) < 0.4
    missing[0] = True  # one row no reward applies to
    per_func = torch.where(missing, torch.full_like(values, NAN), values)
    weights = [1.0, 0.5, -2.0]
    out = combine_rewards(per_func, weights)
    rows = [[None if math.isnan(v) else v for v in row] for row in per_func.tolist()]
    ref = combine_rewards_reference(rows, weights)
    for got, want, ok in zip(out.rewards.tolist(), ref, out.applicable.tolist()):
        assert ok == (want is not None)
        assert math.isnan(got) if want is None else got == pytest.approx(want, rel=1e-13)


def test_combine_rewards_hand_case_and_errors():
    # Row 0: 1*1 + 0.5*None + 2*0.25 = 1.5; row 1: only the second applies, 0.5*4 = 2; row 2: none -> NaN.
    per_func = torch.tensor([[1.0, NAN, 0.25], [NAN, 4.0, NAN], [NAN, NAN, NAN]], dtype=torch.float64)
    out = combine_rewards(per_func, (1.0, 0.5, 2.0))
    assert out.rewards[:2].tolist() == [1.5, 2.0] and math.isnan(out.rewards[2])
    assert out.applicable.tolist() == [True, True, False]
    assert combine_rewards(per_func[:2]).rewards.tolist() == [1.25, 4.0]  # weights default to 1
    with pytest.raises(ValueError, match="2 weights for 3 rewards"):
        combine_rewards(per_func, (1.0, 2.0))
    with pytest.raises(ValueError, match="reward 1 is infinite at row 0"):
        combine_rewards(torch.tensor([[0.0, math.inf]], dtype=torch.float64))


def test_missing_rewards_leave_the_baseline_and_get_zero_advantage():
    # Group a: [1, NaN, 0, 0] -> baseline over [1, 0, 0] only; group b: [NaN, 1] -> one scored completion:
    # A = 0 with TRL's rule (singleton="zero"), A = R with verl's singleton rule (singleton="reward").
    rewards = torch.tensor([1.0, NAN, 0.0, 0.0, NAN, 1.0], dtype=torch.float64)
    ids = ["a", "a", "a", "a", "b", "b"]
    kept = advantages_reference([1.0, 0.0, 0.0, 1.0], ["a", "a", "a", "b"])
    out = masked_group_advantages(rewards, ids, singleton="reward")
    assert out.advantages.tolist() == pytest.approx([kept[0], 0.0, kept[1], kept[2], 0.0, kept[3]], rel=1e-12)
    assert kept[3] == pytest.approx(1.0, rel=1e-5)
    trl = masked_group_advantages(rewards, ids, singleton="zero")
    assert trl.advantages.tolist() == pytest.approx([kept[0], 0.0, kept[1], kept[2], 0.0, 0.0], rel=1e-12)
    assert out.stats["frac_reward_missing"] == pytest.approx(2 / 6)
    full = masked_group_advantages(rewards.nan_to_num(0.5), ids)  # nothing missing: plain group advantages
    assert_close(full.advantages, group_advantages(rewards.nan_to_num(0.5), ids).advantages)


def _rows_and_rollouts(texts_per_prompt):
    rows = pd.DataFrame({"id": [f"p{i}" for i in range(len(texts_per_prompt))],
                         "prompt": ["q"] * len(texts_per_prompt), "answer": ["4"] * len(texts_per_prompt)})
    members = [[Member(f"p{k}", "policy", t, [5, 2], False, [-1.0, -0.5]) for t in texts]
               for k, texts in enumerate(texts_per_prompt)]
    return rows, grpo.Rollouts(prompt_ids=[[3, 4]] * len(texts_per_prompt), members=members)


@pytest.mark.parametrize("specs,weights", [
    (("exact_match", "tests.reward_helpers:none_for_odd_id"), (1.0, 0.5)),
    (("tests.reward_helpers:none_for_odd_id", "tests.reward_helpers:none_unless_long"), (2.0, 1.0)),
])
def test_reward_rollouts_weighted_rewards_with_none(specs, weights):
    texts = [["\\boxed{4}", "44", "x", "\\boxed{5}"], ["\\boxed{4}", "x", "no four", "4"], ["x", "x", "x", "x"]]
    rows, rollouts = _rows_and_rollouts(texts)
    cfg = GRPOConfig(num_generations=4, rewards=specs, reward_weights=weights)
    verifiers = [Verifier(s) for s in specs]
    try:
        scored = grpo.reward_rollouts(verifiers, cfg, rows, rollouts)
    finally:
        for s in verifiers:
            s.close()
    fns = [exact_match if s == "exact_match" else getattr(reward_helpers, grpo.reward_name(s)) for s in specs]
    records = rows.to_dict("records")
    per_func = [[fn(t, records[k]) for fn in fns] for k, ts in enumerate(texts) for t in ts]
    want = combine_rewards_reference(per_func, weights)
    table = scored.table
    for got, w in zip(table["reward"], want):
        assert math.isnan(got) if w is None else got == pytest.approx(w)
    kept = [i for i, w in enumerate(want) if w is not None]
    adv = advantages_reference([want[i] for i in kept], [table["prompt_id"][i] for i in kept], singleton="zero")
    expected = [0.0] * len(want)
    for i, a in zip(kept, adv):
        expected[i] = a
    assert table["advantage"].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert list(table.columns) == ["prompt_id", "group_index", "source", "response", "token_ids",
                                   "sampler_logprobs", "reward", "advantage", "truncated"]


def test_reward_weights_must_match_rewards():
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 rewards"):
        GRPOConfig(rewards=("math_answer", "exact_match"), reward_weights=(1.0,))


# --------------------------------------------------------------------------------------------- training path


def _sample(model, prompt, length, gen):
    """Ancestral sampling from the model at temperature 1: tokens and their log-probs."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(length):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
            ids.append(tok)
            logps.append(float(logp[tok]))
    return ids[len(prompt):], logps


def _on_policy_round(model, n_prompts=3, group=4, seed=0):
    """Rollouts of the model itself (sampler log-probs: the model's at sampling time) with group advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = [[int(x) for x in torch.randint(3, 60, (3 + k,), generator=gen)] for k in range(n_prompts)]
    records = []
    for k, prompt in enumerate(prompt_ids):
        for _ in range(group):
            tokens, logps = _sample(model, prompt, int(torch.randint(2, 7, (1,), generator=gen)), gen)
            records.append({"prompt_id": f"p{k}", "group_index": k, "token_ids": tokens, "sampler_logprobs": logps,
                            "reward": float(torch.randint(0, 2, (1,), generator=gen))})
    table = pd.DataFrame(records)
    table["advantage"] = group_advantages(torch.tensor(table["reward"].tolist(), dtype=torch.float64),
                                          table["prompt_id"].tolist()).advantages.tolist()
    return prompt_ids, table


def _plain_logprobs(model, prompt_ids, table):
    """Per completion, full-logit float64 log-probs of its tokens, one sequence at a time (with grad)."""
    out = []
    for g, tokens in zip(table["group_index"], table["token_ids"]):
        ids = torch.tensor([prompt_ids[g] + list(tokens)])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(logp[-len(tokens):])
    return out


def _reference_gradient(model, prompt_ids, table, aggregation, weights, max_tokens):
    """grad of -(sum_k A_k sum_t w_kt log p_kt) / Z, Z = tokens | (per-sequence means, N) | N * T_max."""
    lps = _plain_logprobs(model, prompt_ids, table)
    terms = [-a * (w * lp) for a, w, lp in zip(table["advantage"], weights, lps)]
    if aggregation == "token-mean":
        loss = sum(t.sum() for t in terms) / sum(len(t) for t in terms)
    elif aggregation == "seq-mean-token-mean":
        loss = sum(t.mean() for t in terms) / len(terms)
    elif aggregation == "seq-mean-token-sum":
        loss = sum(t.sum() for t in terms) / len(terms)
    elif aggregation == "seq-mean-token-sum-norm":
        loss = sum(t.sum() for t in terms) / max_tokens
    else:
        loss = sum(t.sum() for t in terms) / (len(terms) * max_tokens)
    loss.backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters()}


def _run_round(model, prompt_ids, table, cfg):
    """grpo.behaviour -> round_examples -> make_trainer -> train_round, capturing the gradient of every step."""
    behave = grpo.behaviour(model, table, prompt_ids, cfg, pad_id=PAD)
    examples = grpo.round_examples(table, prompt_ids, behave, None)
    train_cfg = cfg.train.model_copy(update={"sequences_per_step": len(table) // cfg.minibatches_per_round})
    trainer = make_trainer(model, train_cfg, total_steps=cfg.minibatches_per_round * cfg.num_iterations)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = []
    trainer.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {names[id(p)]: p.grad.double().clone() for group in opt.param_groups for p in group["params"]}))
    history = grpo.train_round(trainer, examples, cfg, 0, pad_id=PAD)
    return behave, examples, history, grads


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm", "dr_grpo"])
@pytest.mark.parametrize("correction", ["none", "token", "sequence"])
def test_on_policy_round_ratio_is_one_and_gradient_is_the_policy_gradient(aggregation, correction):
    model = tiny_lm(seed=1)
    prompt_ids, table = _on_policy_round(model)
    if correction != "none":  # a visible sampler/trainer gap, so that the weights are not 1
        noise = torch.Generator().manual_seed(5)
        table["sampler_logprobs"] = [[x + 0.2 * float(torch.randn(1, generator=noise)) for x in lp]
                                     for lp in table["sampler_logprobs"]]
    mode = {"none": "none", "token": "token_truncate", "sequence": "sequence_truncate"}[correction]
    cfg = GRPOConfig(num_generations=4, aggregation=aggregation, sampler_correction=mode,
                     sampler_correction_max=1.2, max_response_tokens=8,
                     train=TrainConfig(lr=1e-3, max_grad_norm=None, micro_batch_size=5))  # 12 rows: 3 micro-batches
    reference = copy.deepcopy(model)
    behave, _, history, grads = _run_round(model, prompt_ids, table, cfg)
    assert len(history) == 1 and history[0]["step"] == 1.0
    assert history[0]["ratio_mean"] == 1.0  # exactly: old log-probs are the current ones, detached
    assert history[0]["clip_ratio/region_mean"] == 0.0
    weights = [torch.ones(len(t), dtype=torch.float64) for t in table["token_ids"]]
    if correction != "none":
        lps = [lp.detach() for lp in _plain_logprobs(reference, prompt_ids, table)]
        width = max(len(x) for x in lps)
        lp = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in lps])
        q = torch.tensor([list(x) + [0.0] * (width - len(x)) for x in table["sampler_logprobs"]], dtype=torch.float64)
        mask = torch.tensor([[t < len(x) for t in range(width)] for x in lps])
        ref_w = importance_weights_reference(lp, q, mask, level=correction, cap=1.2)
        weights = [ref_w[i, :len(x)] for i, x in enumerate(lps)]
        assert any(float(w.min()) < 0.99 for w in weights) and max(float(w.max()) for w in weights) <= 1.2
        assert_close(torch.cat(behave.is_weights).double(), torch.cat(weights), rtol=1e-4, atol=1e-5)
    want = _reference_gradient(reference, prompt_ids, table, aggregation, weights, cfg.max_response_tokens)
    for name, g in grads[0].items():
        assert_close(g, want[name], rtol=2e-4, atol=1e-7, msg=name)
    assert behave.metrics["sampling/sampling_logp_difference/mean"] < (1e-5 if correction == "none" else 1.0)


def test_later_steps_use_the_old_logprobs_of_the_rounds_start():
    # num_iterations = 2 x 2 minibatches: 4 steps; the first is exactly on-policy, the others see the policy
    # move away from lp_old (computed once, before the first update) and clip.
    model = tiny_lm(seed=2)
    prompt_ids, table = _on_policy_round(model, seed=3)
    cfg = GRPOConfig(num_generations=4, num_iterations=2, minibatches_per_round=2, eps_low=0.01, eps_high=0.01,
                     sampler_correction="none", train=TrainConfig(lr=3e-2, micro_batch_size=4))
    before = copy.deepcopy(model)
    behave, examples, history, _ = _run_round(model, prompt_ids, table, cfg)
    assert [h["step"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert [(h["iteration"], h["minibatch"]) for h in history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert history[0]["ratio_mean"] == 1.0
    assert all(h["ratio_mean"] != 1.0 for h in history[1:])
    assert max(h["clip_ratio/region_mean"] for h in history[1:]) > 0
    start = [lp.float() for lp in _plain_logprobs(before, prompt_ids, table)]
    for ex, lp in zip(examples.stale, start):
        assert_close(torch.tensor(ex.old_logprobs), lp, rtol=1e-4, atol=1e-5)
    assert all(ex.old_logprobs is None for ex in examples.fresh)


def test_the_first_step_of_a_round_never_reads_the_stored_old_logprobs():
    # Whatever the stored lp_old, the round's first step takes the current log-probs detached: shift the
    # stored ones by 1 nat, and the first step's ratio is still exactly 1 (the second's is about e).
    from dataclasses import replace

    model = tiny_lm(seed=4)
    prompt_ids, table = _on_policy_round(model, seed=6)
    cfg = GRPOConfig(num_generations=4, minibatches_per_round=2, sampler_correction="none",
                     train=TrainConfig(lr=1e-4, micro_batch_size=8))
    behave = grpo.behaviour(model, table, prompt_ids, cfg, pad_id=PAD)
    examples = grpo.round_examples(table, prompt_ids, behave, None)
    shifted = grpo.RoundExamples(fresh=examples.fresh, stale=[
        replace(ex, old_logprobs=[x - 1.0 for x in ex.old_logprobs]) for ex in examples.stale])
    train_cfg = cfg.train.model_copy(update={"sequences_per_step": len(table) // 2})
    trainer = make_trainer(model, train_cfg, total_steps=2)
    history = grpo.train_round(trainer, shifted, cfg, 0, pad_id=PAD)
    assert history[0]["ratio_mean"] == 1.0
    assert history[1]["ratio_mean"] == pytest.approx(math.e, rel=0.05)


@pytest.mark.parametrize("temperature", [0.6, 1.5])
def test_hf_engine_samples_at_a_temperature_and_the_sampler_comparison_stays_raw(tmp_path, temperature):
    # The HF engine reports raw (temperature 1) log-probs whatever it samples at; with score_at_temperature the
    # behaviour pass keeps lp_old tempered but compares the sampler with the trainer's raw log-probs: no gap on
    # the engine's own model, and the importance weights stay 1, where tempered against raw would be far off.
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.rollout.engines import HFEngine
    from tests.integration.test_engines import PROMPTS, save_tiny_checkpoint

    engine = HFEngine(save_tiny_checkpoint(tmp_path, seed=0), EngineConfig(batch_size=4, dtype="float32"),
                      progress=False)
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=8, seed=1)
    groups = engine.generate(PROMPTS, 2, sampling)
    table = pd.DataFrame([{"group_index": g, "token_ids": c.token_ids, "sampler_logprobs": c.logprobs}
                          for g, group in enumerate(groups) for c in group])
    cfg = GRPOConfig(num_generations=2, score_at_temperature=True, sampling=sampling)
    behave = grpo.behaviour(engine.model, table, PROMPTS, cfg, pad_id=engine.tokenizer.pad_token_id)
    assert behave.metrics["sampling/sampling_logp_difference/max"] < 1e-4
    assert max(abs(float(w.max()) - 1) for w in behave.is_weights) < 1e-4
    q = torch.tensor([x for lp in table["sampler_logprobs"] for x in lp], dtype=torch.float64)
    tempered = torch.cat([lp.double() for lp in behave.logprobs])
    assert (tempered - q).abs().max() > 0.1  # lp_old is the tempered policy's, not the engine's raw numbers
    engine.close()
