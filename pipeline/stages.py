"""One function per stage: small artifact references and a sub-config in, one reference out.

Every stage is cached by `stage_key(stage, version, config digest, input digests)` in a `StageStore`: a
verified hit is served without work, anything missing or altered is recomputed. Stages never pass models,
engines or DataFrames; engines and reward workers are process-level resources kept in `Resources`. The cache
rule, `Resources` and the stage versions live in `pipeline.runtime`.

    prepare_data -> bootstrap_models -> teacher_sample -> sft ----------------> evaluate
                                                       \\-> gft_round x R ----> evaluate
    any checkpoint (base, SFT, GFT) -> grpo_round x R -----------------------> evaluate
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data import chat, synthetic
from pipeline.data import prompts as data_lib
from pipeline.rounds import bootstrap as bootstrap_lib
from pipeline.rounds import groups
from pipeline.rounds import grpo as grpo_lib
from pipeline.store.artifacts import ArtifactRef, tree_sha256
from pipeline.model.batches import Example, plan_step
from pipeline.runtime import Resources, StageSpec, cached, model_dir
from pipeline.config import (
    DataConfig, EvalConfig, GFTConfig, GRPOConfig, SFTConfig, SyntheticConfig, TeacherSampleConfig,
)
from pipeline.algo.metrics import accuracy_metrics, kl_per_token
from pipeline.rounds.evaluate import score_prompt
from pipeline.model.scoring import dft_objective, gft_objective, score_responses, sft_objective
from pipeline.model.loop import fit
from pipeline.model.trainer import make_trainer, save_model, train_step

log = logging.getLogger(__name__)

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _read_parquet(ref: ArtifactRef, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(ref.uri) / name)


def _tokenizer(model_path: str, trust_remote_code: bool = False):
    return chat.load_tokenizer(model_path, trust_remote_code=trust_remote_code)


def _load_model(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------------------
# prepare_data, bootstrap_models, teacher_sample
# ---------------------------------------------------------------------------------------------------------


def prepare_data_spec(cfg: DataConfig, synth: SyntheticConfig, res: Resources) -> StageSpec:
    source = data_lib.source_ref(cfg)  # a local file's content is part of the key
    configs = (cfg, synth) if cfg.source == "synthetic" else (cfg,)
    return StageSpec("prepare_data", configs, (source,) if source else (), "prompts")


def prepare_data(cfg: DataConfig, synth: SyntheticConfig, res: Resources) -> ArtifactRef:
    """Load, validate and split the prompt set into train.parquet and eval.parquet."""
    def build(out: Path, key: str) -> dict[str, float]:
        prompts = _load_prompt_set(cfg, synth, res)
        split = data_lib.split_prompts(prompts.rows, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                       max_prompts=cfg.max_prompts)
        data_lib.write_prompts_parquet(split.train, out / "train.parquet")
        data_lib.write_prompts_parquet(split.eval, out / "eval.parquet")
        _write_json(out / "report.json", prompts.report.to_dict())
        return {"train_prompts": float(len(split.train)), "eval_prompts": float(len(split.eval)),
                "skipped_rows": float(prompts.report.skipped)}

    return cached(res, prepare_data_spec(cfg, synth, res), build)


def _load_prompt_set(cfg: DataConfig, synth: SyntheticConfig, res: Resources):
    scorer = res.scorer("pipeline.rollout.verifiers:gold_check")

    def gold_parses(answer: str) -> bool:
        return scorer.score_one("", {"answer": answer})[1] is None

    if cfg.source == "synthetic":
        seen = {r["prompt"] for r in synthetic.split_problems(synth)[0]}  # never the bootstrap's training prompts
        candidates = synthetic.make_problems(4 * cfg.synthetic_rows, seed=synth.seed + 1, levels=synth.levels)
        records = [r for r in candidates if r["prompt"] not in seen and not seen.add(r["prompt"])]
        records = records[: cfg.synthetic_rows]  # distinct prompts, so no eval prompt is also a train prompt
        return data_lib.rows_from_records(records, cfg, gold_check=gold_parses)
    return data_lib.load_prompts(cfg, gold_check=gold_parses)


def bootstrap_models_spec(synth: SyntheticConfig, res: Resources) -> StageSpec:
    return StageSpec("bootstrap_models", (synth,), (), "models")


def bootstrap_models(synth: SyntheticConfig, res: Resources) -> ArtifactRef:
    """The embedded default's teacher and weaker base, trained locally (teacher/model, base/model)."""
    def build(out: Path, key: str) -> dict[str, float]:
        result = bootstrap_lib.bootstrap(out / "work", synth)
        for role, path in (("teacher", result.teacher_dir), ("base", result.base_dir)):
            (out / role).mkdir()
            Path(path).rename(out / role / "model")
        shutil.rmtree(out / "work")
        return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}

    return cached(res, bootstrap_models_spec(synth, res), build)


def bootstrap_member(models: ArtifactRef, role: str) -> ArtifactRef:
    """The reference of one model of the bootstrap pair (its own content digest); pending while the pair is."""
    if models.kind == "pending":
        return models
    folder = Path(models.uri) / role
    return ArtifactRef(kind="model", uri=str(folder), sha256=tree_sha256(folder), schema_version=1)


def teacher_sample_spec(cfg: TeacherSampleConfig, prompts: ArtifactRef, teacher: ArtifactRef,
                        res: Resources) -> StageSpec:
    return StageSpec("teacher_sample", (cfg, res.engine_cfg), (prompts, teacher), "teacher_responses")


def teacher_sample(cfg: TeacherSampleConfig, prompts: ArtifactRef, teacher: ArtifactRef,
                   res: Resources) -> ArtifactRef:
    """K teacher responses per training prompt, sampled once (teacher.parquet: id, responses)."""
    def build(out: Path, key: str) -> dict[str, float]:
        rows = _read_parquet(prompts, "train.parquet")
        tok = _tokenizer(model_dir(teacher), res.engine_cfg.trust_remote_code)
        prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
        engine = res.engine("teacher", model_dir(teacher))
        completions = engine.generate(prompt_ids, cfg.k, cfg.sampling)
        res.count("engine.generate")
        table = pd.DataFrame({"id": rows["id"], "responses": [[c.text for c in cs] for cs in completions]})
        table.to_parquet(out / "teacher.parquet")
        return {"responses": float(len(rows) * cfg.k)}

    return cached(res, teacher_sample_spec(cfg, prompts, teacher, res), build)


# ---------------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------------


def _teacher_map(teacher: ArtifactRef | None, rows: pd.DataFrame) -> dict[str, list[str]]:
    """Teacher responses by prompt id: from the teacher stage, else from the dataset's column."""
    if teacher is not None:
        table = _read_parquet(teacher, "teacher.parquet")
        return {str(i): list(r) for i, r in zip(table["id"], table["responses"])}
    if "teacher_responses" in rows:
        return {str(i): list(r) for i, r in zip(rows["id"], rows["teacher_responses"]) if r is not None}
    return {}


def sft_spec(cfg: SFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef,
             res: Resources) -> StageSpec:
    inputs = (prompts, init) + ((teacher,) if teacher is not None and cfg.source == "mix" else ())
    return StageSpec("sft", (cfg,), inputs, "model")


def sft(cfg: SFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef,
        res: Resources) -> ArtifactRef:
    """Supervised fine-tuning on expert solutions (or SFT(mix) with teacher responses); model/ and history."""

    def build(out: Path, key: str) -> dict[str, float]:
        rows = _read_parquet(prompts, "train.parquet")
        tok = _tokenizer(model_dir(init))
        teachers = _teacher_map(teacher, rows) if cfg.source == "mix" else {}
        examples, truncated = [], 0
        for pid, prompt, solution in zip(rows["id"], rows["prompt"], rows["solution"]):
            prompt_ids = chat.render_prompt(tok, prompt)
            members = groups.off_policy(tok, str(pid), "expert", [solution], cfg.max_response_tokens)
            members += groups.off_policy(tok, str(pid), "teacher", teachers.get(str(pid), []), cfg.max_response_tokens)
            truncated += sum(m.truncated for m in members)
            examples += [Example(prompt_ids, m.token_ids) for m in members]
        objective = sft_objective() if cfg.loss == "sft" else dft_objective()
        work = res.store.root / "sft" / f".ckpt-{key}"  # outside the temp folder: a rerun resumes from it
        result = fit(_load_model(model_dir(init)), examples, objective, cfg.train, pad_id=_pad_id(tok),
                     checkpoint_dir=work, progress_bar=res.progress)
        res.count("optimizer.step", len(result.history))
        save_model(result.trainer, out / "model", tok)
        _write_history(out / "history.jsonl", result.history)
        shutil.rmtree(work, ignore_errors=True)
        last = result.history[-1] if result.history else {}
        return {"examples": float(len(examples)), "truncated_responses": float(truncated),
                "final_loss": last.get("loss", float("nan"))}

    return cached(res, sft_spec(cfg, prompts, teacher, init, res), build)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _write_history(path: Path, history: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


# ---------------------------------------------------------------------------------------------------------
# GFT rounds
# ---------------------------------------------------------------------------------------------------------


def _train_round(res: Resources, cfg: GFTConfig, prev: ArtifactRef, prompt_ids: list[list[int]],
                 table: pd.DataFrame, round_idx: int, out: Path, tok) -> list[dict[str, float]]:
    """`minibatches_per_round` optimizer steps over the round's responses, continuing the optimizer state."""
    examples = [Example(prompt_ids[g], ids, a) for g, ids, a in
                zip(table["group_index"], table["token_ids"], table["advantage"])]
    m = cfg.minibatches_per_round
    train_cfg = cfg.train.model_copy(update={"sequences_per_step": max(1, len(examples) // m)})
    trainer = make_trainer(_load_model(model_dir(prev)), train_cfg, total_steps=cfg.rounds * m)
    if (Path(prev.uri) / "state").is_dir():
        trainer.accelerator.load_state(str(Path(prev.uri) / "state"))
    order = list(range(len(examples)))
    random.Random(cfg.train.seed * 104729 + round_idx).shuffle(order)
    history = []
    for j in range(m):
        step = trainer.progress.step
        micro, totals = plan_step(examples, order[j::m], train_cfg, rank=trainer.accelerator.process_index,
                                  world=trainer.accelerator.num_processes, pad_id=_pad_id(tok))
        result = train_step(trainer, micro, gft_objective(tau=cfg.tau), totals,
                            max_grad_norm=train_cfg.max_grad_norm, step=step)
        trainer.progress.step = step + 1
        history.append({"step": float(step + 1), "round": float(round_idx), **result.metrics})
    res.count("optimizer.step", m)
    trainer.accelerator.save_state(str(out / "state"))
    save_model(trainer, out / "model", tok)
    return history


def gft_round_spec(cfg: GFTConfig, round_idx: int, prompts: ArtifactRef, teacher: ArtifactRef | None,
                   prev: ArtifactRef, res: Resources, *, seed: int = 0) -> StageSpec:
    inputs = (prompts, prev) + ((teacher,) if teacher is not None else ())
    return StageSpec("gft_round", (cfg,), inputs, "model", extra_key=f"round={round_idx},seed={seed}")


def gft_round(cfg: GFTConfig, round_idx: int, prompts: ArtifactRef, teacher: ArtifactRef | None,
              prev: ArtifactRef, res: Resources, *, seed: int = 0) -> ArtifactRef:
    """One GFT round: sample policy members, build and score hybrid groups, advantages, train; groups.parquet,
    model/, state/ (optimizer, scheduler, RNG for the next round) and metrics."""

    def build(out: Path, key: str) -> dict[str, float]:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        rows = groups.round_prompts(_read_parquet(prompts, "train.parquet"), cfg, round_idx, seed)
        tok = _tokenizer(model_dir(prev))
        teachers = _teacher_map(teacher, rows)
        engine = res.engine("policy", model_dir(prev))
        prompt_ids, members = groups.build_groups(engine, cfg, rows, teachers, tok, round_idx)
        res.count("engine.generate", int(cfg.policy > 0))
        times["perf/sample_s"] = time.perf_counter() - t0
        scored = groups.score_groups(res.scorer(cfg.reward), cfg, rows, members)
        table = scored.table
        table.to_parquet(out / "groups.parquet")
        times["perf/score_s"] = time.perf_counter() - t0 - times["perf/sample_s"]
        history = _train_round(res, cfg, prev, prompt_ids, table, round_idx, out, tok)
        times["perf/train_s"] = time.perf_counter() - t0 - times["perf/sample_s"] - times["perf/score_s"]
        _write_history(out / "history.jsonl", history)
        times.update(_round_perf(times, members, history, time.perf_counter() - t0))
        return {**groups.round_metrics(scored), **times, **{f"train/{k}": v for k, v in history[-1].items()}}

    return cached(res, gft_round_spec(cfg, round_idx, prompts, teacher, prev, res, seed=seed), build)


def _round_perf(times: dict[str, float], members: list[list[groups.Member]], history: list[dict[str, float]],
                round_s: float) -> dict[str, float]:
    """Throughput of one round: sampled policy tokens per second of sampling, trained tokens per second of
    training (both phases end to end: engine and model loading included), and the CUDA peak memory if any."""
    import torch

    sampled = sum(len(m.token_ids) for group in members for m in group if m.source == "policy")
    trained = sum(h.get("tokens", 0.0) for h in history)
    out = {"perf/round_s": round_s, "perf/sample_tokens": float(sampled), "perf/train_tokens": float(trained),
           "perf/sample_tokens_per_s": sampled / max(times["perf/sample_s"], 1e-9),
           "perf/throughput": trained / max(times["perf/train_s"], 1e-9)}
    if torch.cuda.is_available():
        out["perf/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def gft(cfg: GFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef, res: Resources,
        *, seed: int = 0) -> list[ArtifactRef]:
    """All rounds; each round is its own cached stage, so a rerun resumes after the last finished round."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = gft_round(cfg, r, prompts, teacher, prev, res, seed=seed)
        refs.append(prev)
    return refs


# ---------------------------------------------------------------------------------------------------------
# GRPO rounds
# ---------------------------------------------------------------------------------------------------------


def grpo_round_spec(cfg: GRPOConfig, round_idx: int, prompts: ArtifactRef, reference: ArtifactRef,
                    prev: ArtifactRef, res: Resources, *, seed: int = 0) -> StageSpec:
    """The reference is an input only when beta > 0 (otherwise it changes nothing the round writes); the
    engine settings are part of the key, since they change the samples."""
    inputs = (prompts, prev) + ((reference,) if cfg.beta > 0 else ())
    return StageSpec("grpo_round", (cfg, res.engine_cfg), inputs, "model", extra_key=f"round={round_idx},seed={seed}")


@dataclass(frozen=True)
class _GRPOTraining:
    """One history row per optimizer step of the round, and the behaviour pass (lp_old, IS weights, gap)."""

    history: list[dict[str, float]]
    behave: grpo_lib.Behaviour


def _grpo_train(res: Resources, cfg: GRPOConfig, round_idx: int, reference: ArtifactRef, prev: ArtifactRef,
                rollouts: grpo_lib.Rollouts, table: pd.DataFrame, out: Path, tok) -> _GRPOTraining:
    """lp_old and the IS weights under the round's starting policy, reference log-probs when beta > 0, then
    the round's optimizer steps. Optimizer state continues from the previous GRPO round only: round 0 starts
    a fresh optimizer even when `prev` (an SFT or GFT output) carries a state/ of its own."""
    pad_id = _pad_id(tok)
    model = _load_model(model_dir(prev))
    behave = grpo_lib.behaviour(model, table, rollouts.prompt_ids, cfg, pad_id=pad_id)
    ref = None
    if cfg.beta > 0:
        prompts = [rollouts.prompt_ids[g] for g in table["group_index"]]
        ref = score_responses(_load_model(model_dir(reference)), prompts, list(table["token_ids"]),
                              pad_id=pad_id).logprobs
    examples = grpo_lib.round_examples(table, rollouts.prompt_ids, behave, ref)
    m = cfg.minibatches_per_round
    train_cfg = cfg.train.model_copy(update={"sequences_per_step": max(1, len(table) // m)})
    trainer = make_trainer(model, train_cfg, total_steps=cfg.rounds * m * cfg.num_iterations)
    if round_idx > 0 and (Path(prev.uri) / "state").is_dir():
        trainer.accelerator.load_state(str(Path(prev.uri) / "state"))
    history = grpo_lib.train_round(trainer, examples, cfg, train_cfg, round_idx, pad_id=pad_id)
    res.count("optimizer.step", len(history))
    trainer.accelerator.save_state(str(out / "state"))
    save_model(trainer, out / "model", tok)
    return _GRPOTraining(history=history, behave=behave)


def grpo_round(cfg: GRPOConfig, round_idx: int, prompts: ArtifactRef, reference: ArtifactRef, prev: ArtifactRef,
               res: Resources, *, seed: int = 0) -> ArtifactRef:
    """One GRPO round from `prev`: sample G completions per prompt, score, advantages, clipped-surrogate steps
    (KL to `reference`, the checkpoint the GRPO stage started from, when beta > 0). Writes groups.parquet
    (GFT's columns), history.jsonl (one line per optimizer step), model/ and state/."""

    def build(out: Path, key: str) -> dict[str, float]:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        pool = _read_parquet(prompts, "train.parquet").iloc[: cfg.prompt_pool]  # all of them when None
        rows = groups.round_prompts(pool, cfg, round_idx, seed)
        tok = _tokenizer(model_dir(prev))
        rollouts = grpo_lib.sample_rollouts(res.engine("policy", model_dir(prev)), cfg, rows, tok, round_idx)
        res.count("engine.generate")
        times["perf/sample_s"] = time.perf_counter() - t0
        scored = grpo_lib.score_rollouts([res.scorer(r) for r in cfg.rewards], cfg, rows, rollouts)
        scored.table.to_parquet(out / "groups.parquet")
        times["perf/score_s"] = time.perf_counter() - t0 - times["perf/sample_s"]
        trained = _grpo_train(res, cfg, round_idx, reference, prev, rollouts, scored.table, out, tok)
        times["perf/train_s"] = time.perf_counter() - t0 - times["perf/sample_s"] - times["perf/score_s"]
        _write_history(out / "history.jsonl", trained.history)
        prompt_tokens = sum(len(p) for p in rollouts.prompt_ids) * cfg.num_generations
        names = [grpo_lib.reward_name(r) for r in cfg.rewards]
        return grpo_lib.round_metrics(scored, trained.behave, trained.history, names, times, prompt_tokens)

    return cached(res, grpo_round_spec(cfg, round_idx, prompts, reference, prev, res, seed=seed), build)


def grpo(cfg: GRPOConfig, prompts: ArtifactRef, init: ArtifactRef, res: Resources, *, seed: int = 0) -> list[ArtifactRef]:
    """All rounds from `init` (also the KL reference); each round is its own cached stage."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = grpo_round(cfg, r, prompts, init, prev, res, seed=seed)
        refs.append(prev)
    return refs


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def evaluate_spec(cfg: EvalConfig, prompts: ArtifactRef, model: ArtifactRef, base: ArtifactRef,
                  res: Resources) -> StageSpec:
    return StageSpec("evaluate", (cfg, res.engine_cfg), (prompts, model, base), "eval")


def evaluate(cfg: EvalConfig, prompts: ArtifactRef, model: ArtifactRef, base: ArtifactRef,
             res: Resources) -> ArtifactRef:
    """Held-out mean@k, pass@k, greedy accuracy, entropy and KL(base || policy): metrics.json, samples.parquet."""
    def build(out: Path, key: str) -> dict[str, float]:
        rows = _read_parquet(prompts, "eval.parquet")
        rows = rows.iloc[: cfg.max_prompts] if cfg.max_prompts else rows
        tok = _tokenizer(model_dir(model))
        prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
        engine = res.engine("eval", model_dir(model))
        sampled = engine.generate(prompt_ids, cfg.k, cfg.sampling)
        greedy = engine.generate(prompt_ids, 1, cfg.sampling.model_copy(update={"temperature": 0.0}))
        res.count("engine.generate", 2)
        scorer = res.scorer(cfg.reward)
        records = rows.to_dict("records")
        per_prompt = [score_prompt(scorer, rec, [c.text for c in cs], g[0].text)
                      for rec, cs, g in zip(records, sampled, greedy)]
        metrics = accuracy_metrics(per_prompt, k=cfg.k)
        metrics.update(_entropy_and_kl(res, cfg, model, base, prompt_ids, sampled, tok))
        _samples_table(rows, sampled, greedy, per_prompt).to_parquet(out / "samples.parquet")
        _write_json(out / "metrics.json", metrics)
        return metrics

    return cached(res, evaluate_spec(cfg, prompts, model, base, res), build)


def _entropy_and_kl(res: Resources, cfg: EvalConfig, model: ArtifactRef, base: ArtifactRef,
                    prompt_ids: list[list[int]], sampled, tok) -> dict[str, float]:
    policy = _load_model(model_dir(model)).eval()
    flat_p = [p for p, cs in zip(prompt_ids, sampled) for _ in cs]
    flat_r = [list(c.token_ids) for cs in sampled for c in cs]
    own = score_responses(policy, flat_p, flat_r, pad_id=_pad_id(tok))
    tokens = sum(e.numel() for e in own.entropy)
    out = {"entropy": sum(float(e.sum()) for e in own.entropy) / max(tokens, 1)}
    if cfg.kl_samples > 0:
        base_samples = res.engine("base", model_dir(base)).generate(
            prompt_ids, cfg.kl_samples, cfg.sampling.model_copy(update={"temperature": 1.0}))
        bp = [p for p, cs in zip(prompt_ids, base_samples) for _ in cs]
        br = [list(c.token_ids) for cs in base_samples for c in cs]
        base_scores = score_responses(_load_model(model_dir(base)).eval(), bp, br, pad_id=_pad_id(tok))
        out["kl_base_policy"] = kl_per_token(base_scores.logprobs, score_responses(policy, bp, br,
                                                                                     pad_id=_pad_id(tok)).logprobs)
    return out


def _samples_table(rows: pd.DataFrame, sampled, greedy, per_prompt) -> pd.DataFrame:
    return pd.DataFrame({
        "id": rows["id"].astype(str), "answer": rows["answer"].astype(str),
        "samples": [[c.text for c in cs] for cs in sampled], "rewards": [s.rewards for s in per_prompt],
        "greedy": [g[0].text for g in greedy], "greedy_reward": [s.greedy_reward for s in per_prompt],
    })


# The key of every stage call from the stage's own arguments (Prefect's cache_key_fn uses these).
SPECS: dict[str, Callable[..., StageSpec]] = {
    "prepare_data": prepare_data_spec, "bootstrap_models": bootstrap_models_spec,
    "teacher_sample": teacher_sample_spec, "sft": sft_spec, "gft_round": gft_round_spec, "grpo_round": grpo_round_spec,
    "evaluate": evaluate_spec,
}
