"""The peers' remaining loss options (issue 24, item 5), each against a float64 loop written from the peer's
documented semantics (value and gradient), and for the invariances they promise:

- GFT's loss aggregation, the released code's `loss_agg_mode` (verl agg_loss): token-mean; seq-mean-token-mean;
  seq-mean-token-sum; seq-mean-token-sum-norm (sum / T). The same over one micro-batch or several.
- With GSPO's sequence-level ratio, `clip_ratio/*` are means over sequences, as TRL's `masked_batch_mean` takes
  them when the ratio is [B, 1]: `x.mean()`.
- Log-probs and entropy scored at the sampling temperature: log_softmax(logits / T) (verl `logits.div_(T)`, TRL
  `logits / self.temperature`), on the fused chunked path, the logits path, and in both rounds.
"""

import copy
import math

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from pipeline.algo.losses import gft_loss, grpo_loss, step_normalizer
from pipeline.config import GFTConfig, GRPOConfig, SamplingConfig, TrainConfig
from pipeline.model.batches import Example, StepTotals, collate_padded, plan_step
from pipeline.model.logprobs import token_logprobs, token_logprobs_from_logits
from pipeline.model.scoring import (
    GRPOLossOptions, ScoredTokens, TokenScorer, differentiable_entropy, gft_objective, grpo_objective,
    scoring_temperature,
)
from pipeline.model.trainer import make_trainer, train_step
from pipeline.rounds import gft, grpo
from tests.conftest import PAD, random_examples, tiny_lm
from tests.reference import aggregate_reference

GFT_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# --------------------------------------------------------------------------------------------- loop references


def gft_agg_reference(lp, adv, mask, *, tau, aggregation, t_len=None):
    """The released code's compute_gft_loss then verl's agg_loss, one Python loop per token: -A C(p) log p,
    C = p (detached) if p <= tau else 1; fully masked rows are left out of the seq-mean modes."""
    n, width = lp.shape
    t_len = width if t_len is None else t_len
    sums, counts = [], []
    for i in range(n):
        total, count = 0.0 * lp.sum(), 0
        for t in range(width):
            if not mask[i, t]:
                continue
            p = math.exp(lp[i, t].item())
            total = total - float(adv[i]) * (p if p <= tau else 1.0) * lp[i, t]
            count += 1
        sums.append(total)
        counts.append(count)
    return aggregate_reference(sums, counts, aggregation, t_len)


def trl_clip_ratio_reference(lp, old, adv, mask, *, eps_low, eps_high, level, over_tokens=False):
    """TRL _compute_loss's clip metrics: coef_1 per token, or exp(mean log ratio) as [B, 1] per sequence;
    masked_batch_mean = x.mean() over sequences for [B, 1], else the masked token mean. `over_tokens`: the
    sequence ratio's flags averaged over tokens instead (what this project logged before)."""
    flags = {"low": [], "high": [], "region": []}
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[i, t]]
        seq = math.exp(sum(lp[i, t].item() - old[i, t].item() for t in toks) / max(len(toks), 1))
        for t in (toks[:1] if level == "sequence" and not over_tokens else toks):
            r = seq if level == "sequence" else math.exp(lp[i, t].item() - old[i, t].item())
            low, high = r < 1 - eps_low and adv[i] < 0, r > 1 + eps_high and adv[i] > 0
            flags["low"].append(float(low))
            flags["high"].append(float(high))
            flags["region"].append(float(low or high))
    return {f"clip_ratio/{k}_mean": sum(v) / len(v) for k, v in flags.items()}


def tempered_reference(logits, labels, temperature):
    """float64 log_softmax(logits / T): log p(label) and entropy per row."""
    logp = torch.log_softmax(logits.double() / temperature, -1)  # [N, V]
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------- inputs


def _inputs(seed, n=6, t=7, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    lp = (-3 * torch.rand(n, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    mask[:, 0] = True
    if empty_row:
        mask[2] = False
    return lp, adv, mask, g


def _check(got, want, *leaves, tol=1e-12):
    assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(got, leaves, retain_graph=True), torch.autograd.grad(want, leaves)):
        assert_close(a, b, rtol=tol, atol=tol)


def _flat(lp, adv, mask, rows):
    """The ScoredTokens of `rows` of padded [N, T] inputs, flat as the trainer hands them to an objective."""
    keep = mask[rows]
    idx = torch.arange(lp.shape[0])[rows, None].expand_as(lp[rows])
    return ScoredTokens(logprobs=lp[rows][keep], entropy=None, advantages=adv[rows, None].expand_as(lp[rows])[keep],
                        old_logprobs=None, rows=idx[keep], mask=torch.ones(int(keep.sum()), dtype=torch.bool))


# --------------------------------------------------------------------------------------------- 1. GFT aggregation


@pytest.mark.parametrize("aggregation", GFT_MODES)
@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_gft_aggregations_match_the_released_code(aggregation, empty_row, tau, seed):
    lp, adv, mask, _ = _inputs(seed, empty_row=empty_row)
    out = gft_loss(lp, adv, mask, tau=tau, aggregation=aggregation)
    _check(out.loss, gft_agg_reference(lp, adv, mask, tau=tau, aggregation=aggregation), lp)


def test_gft_aggregations_differ_and_token_mean_is_todays_loss():
    lp, adv, mask, _ = _inputs(3)
    losses = {a: gft_loss(lp, adv, mask, tau=0.3, aggregation=a).loss.item() for a in GFT_MODES}
    assert len({round(v, 12) for v in losses.values()}) == 4, losses
    assert losses["token-mean"] == gft_loss(lp, adv, mask, tau=0.3).loss.item()


@pytest.mark.parametrize("aggregation", GFT_MODES)
@pytest.mark.parametrize("split", [[range(0, 6)], [range(0, 1), range(1, 4), range(4, 6)],
                                   [range(i, i + 1) for i in range(6)]])
def test_gft_objective_is_the_same_over_any_micro_batch_split(aggregation, split):
    # The objective divides every micro-batch by the step's global normalizer: the sum over micro-batches of
    # the loss and of its gradient is the whole step's, which is the released code's agg_loss on one batch.
    lp, adv, mask, _ = _inputs(5)
    totals = StepTotals(tokens=int(mask.sum()), sequences=lp.shape[0])
    objective = gft_objective(tau=0.3, aggregation=aggregation, max_response_tokens=lp.shape[1])
    parts = sum(objective(_flat(lp, adv, mask, slice(r.start, r.stop)), totals).loss for r in split)
    _check(parts, gft_agg_reference(lp, adv, mask, tau=0.3, aggregation=aggregation), lp)


@pytest.mark.parametrize("aggregation", GFT_MODES)
@pytest.mark.parametrize("packing", [False, True])
def test_gft_training_step_gradient_does_not_depend_on_the_micro_batches(aggregation, packing):
    # Through the trainer (padded or packed rows, float64): micro-batches of 1 and of the whole step give one
    # gradient, the full-logit float64 reference's. Batches hold advantages in float32: take float32 ones.
    examples = [Example(ex.prompt_ids, ex.response_ids, float(torch.tensor(ex.advantage, dtype=torch.float32)))
                for ex in random_examples(6, seed=4)]
    model = tiny_lm(seed=3, dtype=torch.float64)
    want = _gft_reference_gradient(copy.deepcopy(model), examples, aggregation, t_len=9)
    for size in (6, 1):
        cfg = TrainConfig(sequences_per_step=6, micro_batch_size=size, packing=packing, micro_batch_tokens=20 * size,
                          max_grad_norm=None, lr=1e-3)
        got = _step_gradient(copy.deepcopy(model), examples, gft_objective(
            tau=0.3, aggregation=aggregation, max_response_tokens=9), cfg)
        for name, g in want.items():
            assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=f"{name} micro_batch_size={size}")


def _step_gradient(model, examples, objective, cfg):
    trainer = make_trainer(model, cfg, total_steps=1)
    micro, totals = plan_step(examples, range(len(examples)), cfg, rank=0, world=1, pad_id=PAD)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}
    trainer.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        {names[id(p)]: p.grad.clone() for group in opt.param_groups for p in group["params"]}))
    train_step(trainer, micro, objective, totals, max_grad_norm=None, step=0)
    return grads


def _token_logprobs(model, ex, temperature=1.0):
    """float64 log p of the example's response tokens from the full logits, one sequence at a time."""
    ids = torch.tensor([list(ex.prompt_ids) + list(ex.response_ids)])
    logits = model(ids).logits[0, :-1].double() / temperature  # [L - 1, V]
    logp = torch.log_softmax(logits, -1)
    n = len(ex.response_ids)
    return logp.gather(-1, ids[0, 1:, None])[-n:, 0], logp[-n:]


def _gft_reference_gradient(model, examples, aggregation, *, t_len, tau=0.3, temperature=1.0):
    rows = [_token_logprobs(model, ex, temperature)[0] for ex in examples]
    width = max(len(r) for r in rows)
    lp = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])  # [N, T]
    mask = torch.tensor([[t < len(r) for t in range(width)] for r in rows])
    adv = torch.tensor([float(ex.advantage) for ex in examples], dtype=torch.float64)
    gft_agg_reference(lp, adv, mask, tau=tau, aggregation=aggregation, t_len=t_len).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gft_config_takes_the_released_codes_modes_only():
    assert GFTConfig().aggregation == "token-mean" and GFTConfig().score_at_temperature is False
    assert GFTConfig(aggregation="seq-mean-token-sum-norm").aggregation == "seq-mean-token-sum-norm"
    with pytest.raises(ValueError, match="aggregation"):
        GFTConfig(aggregation="dr_grpo")
    with pytest.raises(ValueError, match="needs max_response_tokens"):
        gft_objective(tau=0.5, aggregation="seq-mean-token-sum-norm")
    assert step_normalizer("seq-mean-token-sum-norm", tokens=40, sequences=6, max_response_tokens=9) == 9
    assert step_normalizer("dr_grpo", tokens=40, sequences=6, max_response_tokens=9) == 54


# --------------------------------------------------------------------------------------------- 2. clip metrics


def test_sequence_level_clip_ratios_are_fractions_of_sequences_like_trl():
    # Sequence 0 (5 tokens) is clipped high, sequence 1 (1 token) is not: 5/6 of the tokens, 1/2 of the sequences.
    lp = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0] * 5, [0.0] * 5], dtype=torch.float64)  # ratio e on sequence 0, 1 on sequence 1
    mask = torch.tensor([[True] * 5, [True] + [False] * 4])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    kw = dict(eps_low=0.2, eps_high=0.28)
    seq = grpo_loss(lp, old, adv, mask, ratio_level="sequence", **kw).metrics
    tok = grpo_loss(lp, old, adv, mask, ratio_level="token", **kw).metrics
    assert seq["clip_ratio/high_mean"].item() == 0.5 and seq["clip_ratio/region_mean"].item() == 0.5
    assert tok["clip_ratio/high_mean"].item() == pytest.approx(5 / 6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clip_ratios_match_trl(level, seed):
    lp, adv, mask, g = _inputs(seed, n=8, t=9)
    old = lp.detach() + 0.4 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    out = grpo_loss(lp, old, adv, mask, eps_low=0.05, eps_high=0.08, ratio_level=level).metrics
    want = trl_clip_ratio_reference(lp, old, adv, mask, eps_low=0.05, eps_high=0.08, level=level)
    for name, value in want.items():
        assert out[name].item() == pytest.approx(value, abs=1e-15), name
    if level == "sequence":  # each case differs from the token average of the same flags, as the did
        tokens = trl_clip_ratio_reference(lp, old, adv, mask, eps_low=0.05, eps_high=0.08, level=level,
                                          over_tokens=True)
        assert any(abs(want[k] - tokens[k]) > 0.01 for k in want), (want, tokens)


def test_sequence_clip_ratios_of_a_step_are_over_its_sequences_whatever_the_micro_batches():
    # The trainer weighs each micro-batch's sequence mean by its sequence count: micro-batches of 1 and 2 and 5
    # sequences give the fraction of the step's sequences, which differs from the fraction of its tokens.
    model = tiny_lm(seed=5, dtype=torch.float64)
    base = random_examples(10, seed=6)
    shifts = [(-1.0 if k % 3 == 0 else 0.02) for k in range(10)]
    examples = []
    for ex, shift in zip(base, shifts):
        lp = _token_logprobs(model, ex)[0].detach()
        examples.append(Example(ex.prompt_ids, ex.response_ids, 1.0, old_logprobs=(lp + shift).tolist()))
    clipped = [s < 0 for s in shifts]  # ratio e > 1 + eps_high, A > 0
    tokens = sum(len(ex.response_ids) for ex, c in zip(examples, clipped) if c) / sum(len(e.response_ids) for e in base)
    objective = grpo_objective(GRPOLossOptions(eps_low=0.2, eps_high=0.28, ratio_level="sequence"))
    for size in (10, 2, 1, 5):
        cfg = TrainConfig(sequences_per_step=10, micro_batch_size=size, max_grad_norm=None, lr=1e-3)
        trainer = make_trainer(copy.deepcopy(model), cfg, total_steps=1)
        micro, totals = plan_step(examples, range(10), cfg, rank=0, world=1, pad_id=PAD)
        metrics = train_step(trainer, micro, objective, totals, max_grad_norm=None, step=0).metrics
        assert metrics["clip_ratio/high_mean"] == pytest.approx(sum(clipped) / 10, abs=1e-12), size
    assert abs(tokens - sum(clipped) / 10) > 0.02


# --------------------------------------------------------------------------------------------- 3. temperature


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_fused_head_scores_at_the_temperature(temperature, chunk_size, keep_logits):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 23, (11,), generator=g)
    out = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk_size, keep_logits=keep_logits,
                         temperature=temperature)
    want_lp, want_h = tempered_reference(hidden @ weight.T + bias, labels, temperature)
    assert_close(out.entropy, want_h.detach(), rtol=1e-12, atol=1e-12)
    upstream = torch.randn(11, generator=g, dtype=torch.float64)
    _check((out.logprobs * upstream).sum(), (want_lp * upstream).sum(), hidden, weight, bias)


@pytest.mark.parametrize("temperature", [0.5, 1.3])
def test_logits_path_scores_at_the_temperature(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 17, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (9,), generator=g)
    out = token_logprobs_from_logits(logits, labels, chunk_size=4, temperature=temperature)
    want_lp, want_h = tempered_reference(logits, labels, temperature)
    assert_close(out.entropy, want_h.detach(), rtol=1e-12, atol=1e-12)
    _check(out.logprobs.sum(), want_lp.sum(), logits)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_logits(logits, labels, temperature=0.0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_scorer_log_probs_and_entropy_at_the_temperature(fused, entropy_grad):
    model = tiny_lm(dtype=torch.float64)
    batch = collate_padded(random_examples(3, seed=2), range(3), PAD)
    scorer = TokenScorer(model, chunk_size=4, fused=fused)
    differentiable_entropy(scorer, entropy_grad)
    scoring_temperature(scorer, 0.7)
    lp, entropy = scorer(batch.input_ids, batch.position_ids, batch.attention_mask, batch.targets, batch.loss_mask)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.loss_mask]  # [M, V]
    want_lp, want_h = tempered_reference(logits, batch.targets[batch.loss_mask], 0.7)
    assert_close(lp, want_lp, rtol=1e-10, atol=1e-10)
    assert_close(entropy, want_h, rtol=1e-10, atol=1e-10)
    head = model.lm_head.weight
    got = torch.autograd.grad((lp + entropy).sum() if entropy_grad else lp.sum(), head)[0]
    want = torch.autograd.grad((want_lp + want_h).sum() if entropy_grad else want_lp.sum(), head)[0]
    assert_close(got, want, rtol=1e-9, atol=1e-10)


def _on_policy(model, seed=0):
    from tests.integration.test_grpo import _on_policy_round

    return _on_policy_round(model, seed=seed)


def _padded_cat(rows):
    return torch.cat([torch.as_tensor(r, dtype=torch.float64) for r in rows])


def test_behaviour_pass_scores_old_log_probs_at_the_temperature_and_compares_raw_with_the_sampler():
    model = tiny_lm(seed=1)
    prompt_ids, table = _on_policy(model)  # sampler log-probs: the model's raw ones
    cfg = GRPOConfig(num_generations=4, score_at_temperature=True, sampling=SamplingConfig(temperature=0.6))
    behave = grpo.behaviour(model, table, prompt_ids, cfg, pad_id=PAD)
    exs = [Example(prompt_ids[g], list(ids)) for g, ids in zip(table["group_index"], table["token_ids"])]
    with torch.no_grad():
        tempered = torch.cat([_token_logprobs(model, ex, 0.6)[0] for ex in exs])
        raw = torch.cat([_token_logprobs(model, ex)[0] for ex in exs])
    assert_close(_padded_cat(behave.logprobs), tempered, rtol=1e-5, atol=1e-5)
    assert (tempered - raw).abs().max() > 0.05  # the tempered log-probs are not the raw ones
    assert behave.metrics["sampling/sampling_logp_difference/mean"] < 1e-5  # raw against raw: no gap
    assert all(float(w.min()) > 0.999 and float(w.max()) < 1.001 for w in behave.is_weights)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_grpo_round_gradient_and_kl_at_the_temperature(aggregation):
    # On-policy first step: the gradient of -sum_k A_k sum_t log p_T / Z plus beta * k3 against a different
    # reference, every log-prob at softmax(logits / T).

    model, reference = tiny_lm(seed=1), tiny_lm(seed=7)
    prompt_ids, table = _on_policy(model, seed=2)
    cfg = GRPOConfig(num_generations=4, score_at_temperature=True, sampling=SamplingConfig(temperature=0.6),
                     beta=0.5, aggregation=aggregation, sampler_correction="none",
                     train=TrainConfig(lr=1e-3, max_grad_norm=None, micro_batch_size=5))
    start = copy.deepcopy(model)
    trainer_cfg = cfg.train.model_copy(update={"sequences_per_step": len(table)})
    trainer = make_trainer(model, trainer_cfg, total_steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}
    trainer.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        {names[id(p)]: p.grad.double().clone() for group in opt.param_groups for p in group["params"]}))
    trained = grpo.train_phase(trainer, prompt_ids, table, cfg, 0, PAD, reference=reference)
    exs = [Example(prompt_ids[g], list(ids)) for g, ids in zip(table["group_index"], table["token_ids"])]
    terms, kls = [], []
    for ex, a in zip(exs, table["advantage"]):
        lp = _token_logprobs(start, ex, 0.6)[0]
        with torch.no_grad():
            ref = _token_logprobs(reference, ex, 0.6)[0]
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        terms.append(-a * lp + 0.5 * k3)
        kls.append(k3.detach())
    if aggregation == "token-mean":
        loss = sum(t.sum() for t in terms) / sum(len(t) for t in terms)
    else:
        loss = sum(t.mean() for t in terms) / len(terms)
    loss.backward()
    for name, p in start.named_parameters():
        assert_close(grads[name], p.grad.double(), rtol=2e-4, atol=1e-7, msg=name)
    assert trained.history[0]["kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)


def test_gft_round_gradient_at_the_temperature():
    # -A C(p_T) log p_T per token, token mean, p_T = softmax(logits / T)[label]: C from the same p as log p.
    model = tiny_lm(seed=2)
    prompt_ids = [[5, 6, 7], [8, 9]]
    table = pd.DataFrame({"group_index": [0, 0, 1, 1], "token_ids": [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]],
                          "advantage": [1.0, -0.5, 0.8, -1.2]})
    cfg = GFTConfig(score_at_temperature=True, sampling=SamplingConfig(temperature=0.5), minibatches_per_round=1,
                    tau=0.014, train=TrainConfig(lr=1e-3, max_grad_norm=None, micro_batch_size=3))
    start = copy.deepcopy(model)
    trainer = make_trainer(model, cfg.train.model_copy(update={"sequences_per_step": 4}), total_steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}
    trainer.optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        {names[id(p)]: p.grad.double().clone() for group in opt.param_groups for p in group["params"]}))
    history = gft.train_phase(trainer, prompt_ids, table, cfg, 0, PAD)
    exs = [Example(prompt_ids[g], ids, a) for g, ids, a in zip(table["group_index"], table["token_ids"],
                                                               table["advantage"])]
    rows = [_token_logprobs(start, ex, 0.5)[0] for ex in exs]
    width = max(len(r) for r in rows)
    lp = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    mask = torch.tensor([[t < len(r) for t in range(width)] for r in rows])
    adv = torch.tensor(list(table["advantage"]), dtype=torch.float64)
    assert 0 < float((lp.detach()[mask].exp() <= 0.014).double().mean()) < 1  # some tokens rectified, some not
    gft_agg_reference(lp, adv, mask, tau=0.014, aggregation="token-mean").backward()
    for name, p in start.named_parameters():
        assert_close(grads[name], p.grad.double(), rtol=2e-4, atol=1e-7, msg=name)
    assert history[0]["rectified_frac"] == pytest.approx(float((lp.detach()[mask].exp() <= 0.014).double().mean()))


def test_scoring_at_temperature_needs_a_sampling_temperature():
    assert GRPOConfig().score_at_temperature is False
    for make, stage in ((GRPOConfig, "grpo"), (GFTConfig, "gft")):
        with pytest.raises(ValueError, match=f"{stage}.score_at_temperature needs {stage}.sampling.temperature"):
            make(score_at_temperature=True, sampling=SamplingConfig(temperature=0.0))
        assert make(score_at_temperature=False, sampling=SamplingConfig(temperature=0.0)).sampling.temperature == 0


# --------------------------------------------------------------------------------------------- across processes


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_processes_equal_one(tmp_path, aggregation):
    # GFT steps at a seq-mean aggregation, then one GSPO step whose clip_ratio/* is over the step's sequences:
    # 2 gloo processes (each a strided half of every step) against 1, parameters, losses and metrics.
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, __file__, str(one), aggregation], check=True, env=env, timeout=300)
    subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), __file__, str(two), aggregation], check=True, env=env,
                   timeout=300)
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    for name, p in a["params"].items():
        assert_close(b["params"][name], p, rtol=1e-10, atol=1e-12, msg=name)
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-10)
    for m in (a["gspo"], b["gspo"]):
        assert m["clip_ratio/high_mean"] == pytest.approx(a["clipped"], abs=1e-12)
        assert m["clip_ratio/region_mean"] == pytest.approx(a["clipped"], abs=1e-12)


def _dist_main(out: str, aggregation: str) -> None:
    """Run alone or under torchrun by `test_two_processes_equal_one`: 3 GFT steps, then one GSPO step."""
    from pipeline.model.loop import fit
    from pipeline.model.scoring import score_responses

    torch.set_num_threads(1)
    model = tiny_lm(seed=0, dtype=torch.float64)
    cfg = TrainConfig(lr=1e-2, num_steps=3, sequences_per_step=8, micro_batch_size=2)
    result = fit(model, random_examples(24, seed=5), gft_objective(tau=0.5, aggregation=aggregation,
                                                                     max_response_tokens=9), cfg, pad_id=PAD,
                 progress_bar=False)
    trainer, base = result.trainer, random_examples(10, seed=6)
    with torch.no_grad():
        lps = score_responses(trainer.model, [e.prompt_ids for e in base], [e.response_ids for e in base],
                              pad_id=PAD).logprobs
    shifts = [(-1.0 if k % 3 == 0 else 0.02) for k in range(10)]
    examples = [Example(e.prompt_ids, e.response_ids, 1.0, old_logprobs=(lp.double() + s).tolist())
                for e, lp, s in zip(base, lps, shifts)]
    acc = trainer.accelerator
    micro, totals = plan_step(examples, range(10), cfg, rank=acc.process_index, world=acc.num_processes, pad_id=PAD)
    gspo = train_step(trainer, micro, grpo_objective(GRPOLossOptions(eps_low=0.2, eps_high=0.28,
                                                                     ratio_level="sequence")),
                      totals, max_grad_norm=None, step=3).metrics
    if acc.is_main_process:
        torch.save({"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                    "history": result.history, "world": acc.num_processes, "gspo": gspo,
                    "clipped": sum(s < 0 for s in shifts) / 10}, out)


if __name__ == "__main__":  # the test runs this file with PYTHONPATH at the repository root
    import sys

    _dist_main(sys.argv[1], sys.argv[2])
