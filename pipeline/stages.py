"""One function per stage: load -> run -> save, with the cache key derived from the stage's own arguments.

A stage is a function `name(job, *arguments)` registered with `@stage(kind, datasets=...)` (the stage table, `bind`
and `execute` live in `pipeline.runtime` and are re-exported here). Its arguments are settings, artifact references
(by role: the argument's name) and scalars, so `bind` can derive the call's key from them; a setting that changes
what the stage writes is an argument and therefore in the key. `execute` runs a bound call under the cache: a
verified output is served without work, anything missing or altered is recomputed. The registered name is also a
plain function: `stages.gft_round(cfg, 0, prompts, teacher, prev, res=res)`. Stages never pass models, engines or
DataFrames; engines and verifier processes are process-level resources kept in `Resources`. The work of a round
(sampling, rewards, advantages, optimizer steps) is `pipeline.rounds.gft.run_round` / `rounds.grpo.run_round`,
SFT's is `rounds.sft.fit_examples` and evaluation's `rounds.evaluate.evaluate`. Every training phase is a
`rounds.job.TrainJob` the stage fills in (what to load, the folders to write) and runs through `rounds.launch.run`:
in this process, or launched on several. Retention and resume bookkeeping between rounds is the store's
(`pipeline.store.retention`, which the run calls between rounds).

    prepare_data -> bootstrap_models -> teacher_sample -> sft ----------------> evaluate
                                                       \\-> gft_round x R ----> evaluate
    any checkpoint (base, SFT, GFT) -> grpo_round x R -----------------------> evaluate
    prepare_benchmark (one per named benchmark) ------------------------------> evaluate (each checkpoint)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.config import (
    BenchmarkConfig, DataConfig, EngineConfig, EvalConfig, GFTConfig, GRPOConfig, SFTConfig, SyntheticConfig,
    TeacherSampleConfig,
)
from pipeline.data import chat, synthetic
from pipeline.data import prompts as data_lib
from pipeline.rounds import bootstrap as bootstrap_lib
from pipeline.rounds import evaluate as eval_lib
from pipeline.rounds import gft as gft_lib
from pipeline.rounds import grpo as grpo_lib
from pipeline.rounds import launch
from pipeline.rounds import sft as sft_lib
from pipeline.rounds.groups import RoundResult, round_prompts
from pipeline.rounds.job import TrainJob
from pipeline.runtime import STAGES, Job, Resources, StageCall, bind, execute, model_dir, stage
from pipeline.store.artifacts import ArtifactRef, tree_sha256
from pipeline.store.jobs import JOB_FOLDER
from pipeline.store.outputs import EVAL_METRICS, HISTORY

__all__ = ["Job", "StageCall", "STAGES", "bind", "execute", "prepare_data", "prepare_data_inputs", "bootstrap_models",
           "bootstrap_member", "teacher_sample", "sft", "gft_round", "gft", "grpo_round", "grpo",
           "prepare_benchmark_inputs", "prepare_benchmark", "evaluate"]

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _write_history(path: Path, history: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def _read_parquet(ref: ArtifactRef, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(ref.uri) / name)


# ---------------------------------------------------------------------------------------------------------
# prepare_data, bootstrap_models, teacher_sample
# ---------------------------------------------------------------------------------------------------------


@stage("prompts", datasets={"train.parquet": "training", "eval.parquet": "evaluation",
                            "validation.parquet": "validation"})
def prepare_data(job: Job, cfg: DataConfig, synth: SyntheticConfig | None,
                 source: ArtifactRef | None) -> dict[str, float]:
    """Load, validate and split the prompt set into train.parquet, eval.parquet (the test prompts) and
    validation.parquet (empty unless `data.validation_fraction` > 0). `synth` is the synthetic task's settings
    (None unless `cfg.source` is "synthetic"), `source` the local data's content reference
    (`prepare_data_inputs` gives both)."""
    if source != data_lib.source_ref(cfg):
        raise ValueError(f"prepare_data: source must be the content reference of data.source={cfg.source!r} "
                         "(stages.prepare_data_inputs), so that the data's content is in the key")
    prompts = _load_prompt_set(job.res, cfg, synth)
    split = data_lib.split_prompts(prompts.rows, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                   max_prompts=cfg.max_prompts, validation_fraction=cfg.validation_fraction)
    for name, rows in (("train", split.train), ("eval", split.eval), ("validation", split.validation)):
        data_lib.write_prompts_parquet(rows, job.out / f"{name}.parquet")
    _write_json(job.out / "report.json", prompts.report.to_dict())
    return {"train_prompts": float(len(split.train)), "eval_prompts": float(len(split.eval)),
            "validation_prompts": float(len(split.validation)), "skipped_rows": float(prompts.report.skipped)}


def prepare_data_inputs(cfg: DataConfig, synth: SyntheticConfig) -> tuple[SyntheticConfig | None, ArtifactRef | None]:
    """The `synth` and `source` arguments of prepare_data for a data config: the synthetic settings only for the
    synthetic task, the local file's (or folder's) content reference only for local data."""
    return (synth if cfg.source == "synthetic" else None), data_lib.source_ref(cfg)


def _load_prompt_set(res: Resources, cfg: DataConfig, synth: SyntheticConfig | None):
    verifier = res.verifier("pipeline.rollout.verifiers:gold_check")

    def gold_parses(answer: str) -> bool:
        return verifier.reward_one("", {"answer": answer})[1] is None

    if cfg.source == "synthetic":
        synth = synth or SyntheticConfig()
        seen = {r["prompt"] for r in synthetic.split_problems(synth)[0]}  # never the bootstrap's training prompts
        candidates = synthetic.make_problems(4 * cfg.synthetic_rows, seed=synth.seed + 1, levels=synth.levels)
        records = [r for r in candidates if r["prompt"] not in seen and not seen.add(r["prompt"])]
        records = records[: cfg.synthetic_rows]  # distinct prompts, so no eval prompt is also a train prompt
        return data_lib.rows_from_records(records, cfg, gold_check=gold_parses)
    return data_lib.load_prompts(cfg, gold_check=gold_parses)


@stage("models")
def bootstrap_models(job: Job, synth: SyntheticConfig, threads: int = 1) -> dict[str, float]:
    """The embedded default's teacher and weaker base, trained locally (teacher/model, base/model)."""
    result = bootstrap_lib.bootstrap(job.out / "work", synth)
    for role, path in (("teacher", result.teacher_dir), ("base", result.base_dir)):
        (job.out / role).mkdir()
        Path(path).rename(job.out / role / "model")
    shutil.rmtree(job.out / "work")
    return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}


def bootstrap_member(models: ArtifactRef, role: str) -> ArtifactRef:
    """The reference of one model of the bootstrap pair (its own content digest); pending while the pair is."""
    if models.kind == "pending":
        return models
    folder = Path(models.uri) / role
    return ArtifactRef(kind="model", uri=str(folder), sha256=tree_sha256(folder), schema_version=1)


@stage("teacher_responses", datasets={"teacher.parquet": "training"})
def teacher_sample(job: Job, cfg: TeacherSampleConfig, prompts: ArtifactRef, teacher: ArtifactRef,
                   engine: EngineConfig = EngineConfig(), threads: int = 1) -> dict[str, float]:
    """K teacher responses per training prompt, sampled once (teacher.parquet: id, responses)."""
    rows = _read_parquet(prompts, "train.parquet")
    tok = chat.load_tokenizer(model_dir(teacher), trust_remote_code=engine.trust_remote_code)
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    completions = job.res.engine("teacher", model_dir(teacher), engine).generate(prompt_ids, cfg.k, cfg.sampling)
    job.res.count("engine.generate")
    table = pd.DataFrame({"id": rows["id"], "responses": [[c.text for c in cs] for cs in completions]})
    table.to_parquet(job.out / "teacher.parquet")
    return {"responses": float(len(rows) * cfg.k)}


# ---------------------------------------------------------------------------------------------------------
# SFT, GFT and GRPO: bind -> load -> one training job (rounds.job) -> save
# ---------------------------------------------------------------------------------------------------------


def _teacher_map(teacher: ArtifactRef | None, rows: pd.DataFrame) -> dict[str, list[str]]:
    """Teacher responses by prompt id: from the teacher stage, else from the dataset's column."""
    if teacher is not None:
        table = _read_parquet(teacher, "teacher.parquet")
        return {str(i): list(r) for i, r in zip(table["id"], table["responses"])}
    if "teacher_responses" in rows:
        return {str(i): list(r) for i, r in zip(rows["id"], rows["teacher_responses"]) if r is not None}
    return {}


def _train_job(job: Job, stage_name: str, cfg: SFTConfig | GFTConfig | GRPOConfig, start: ArtifactRef, *,
               trust_remote_code: bool, **fields) -> TrainJob:
    """The stage's training job: start from `start`'s model, write model/ (and state/) into the output folder,
    keep the job's inputs in the key's work folder (outside the temp folder: SFT resumes from it after a kill)."""
    work = job.res.store.work_dir(stage_name, job.key)
    return TrainJob(phase=stage_name, config=cfg.model_dump(mode="json"), model=model_dir(start),
                    folder=str(work / JOB_FOLDER), out=str(job.out), trust_remote_code=trust_remote_code, **fields)


@stage("model")
def sft(job: Job, cfg: SFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef,
        trust_remote_code: bool = False, threads: int = 1) -> dict[str, float]:
    """Supervised fine-tuning on expert solutions (or SFT(mix), with `teacher`'s responses); model/, history."""
    rows = _read_parquet(prompts, "train.parquet")
    tok = chat.load_tokenizer(model_dir(init), trust_remote_code=trust_remote_code)
    data = sft_lib.sft_examples(tok, rows, _teacher_map(teacher, rows) if cfg.source == "mix" else {},
                                cfg.max_response_tokens)
    spec = _train_job(job, "sft", cfg, init, trust_remote_code=trust_remote_code, threads=threads,
                      work=str(job.res.store.work_dir("sft", job.key)))
    result = sft_lib.fit_examples(data, spec, cfg.train.launch, progress=job.res.progress,
                                  asleep=job.res.engines_asleep)  # a teacher engine may hold the job's GPUs
    job.res.count("optimizer.step", len(result.history))
    _write_history(job.out / HISTORY, result.full_history)  # with the steps before a resume
    return result.metrics


def _round_phase(job: Job, stage_name: str, cfg: GFTConfig | GRPOConfig, round_idx: int, prev: ArtifactRef, *,
                 resume: bool, trust_remote_code: bool, threads: int, reference: ArtifactRef | None = None):
    """A round's train phase (`rounds.launch.round_phase`): from `prev`'s model/ (and its state/ when `resume`
    and it has one), with the reference model when given; while a launched job runs, sleeping engines sleep."""
    state = Path(prev.uri) / "state"
    spec = _train_job(job, stage_name, cfg, prev, trust_remote_code=trust_remote_code, threads=threads,
                      round_idx=round_idx,
                      state=str(state) if resume and state.is_dir() else None,
                      reference=None if reference is None else model_dir(reference))
    return launch.round_phase(spec, cfg.train.launch, progress=job.res.progress, asleep=job.res.engines_asleep)


def _save_round(job: Job, result: RoundResult, *, sampled: bool = True) -> dict[str, float]:
    """groups.parquet and history.jsonl beside the job's model/ and state/ (state/: float32 weights, optimizer,
    scheduler: the next round continues from these, so a bf16 model/ loses nothing)."""
    result.table.to_parquet(job.out / "groups.parquet")
    _write_history(job.out / HISTORY, result.history)
    job.res.count("optimizer.step", len(result.history))
    if sampled:
        job.res.count("engine.generate")
    return result.metrics


@stage("model", datasets={"groups.parquet": "training"})
def gft_round(job: Job, cfg: GFTConfig, round_idx: int, prompts: ArtifactRef, teacher: ArtifactRef | None,
              prev: ArtifactRef, engine: EngineConfig = EngineConfig(), seed: int = 0,
              threads: int = 1) -> dict[str, float]:
    """One GFT round from `prev` (`rounds.gft.run_round`): groups.parquet, model/, state/ and metrics."""
    rows = round_prompts(_read_parquet(prompts, "train.parquet"), cfg.prompts_per_round, round_idx, seed)
    tok = chat.load_tokenizer(model_dir(prev), trust_remote_code=engine.trust_remote_code)
    phase = _round_phase(job, "gft_round", cfg, round_idx, prev, resume=True,
                         trust_remote_code=engine.trust_remote_code, threads=threads)

    def train(prompt_ids: list[list[int]], table: pd.DataFrame) -> list[dict[str, float]]:
        with job.res.training():  # the policy's HF engine is released: the trainer loads its own copy
            return phase(prompt_ids, table).history

    result = gft_lib.run_round(train, job.res.engine("policy", model_dir(prev), engine), job.res.verifier(cfg.reward),
                               rows, _teacher_map(teacher, rows), tok, cfg, round_idx=round_idx)
    return _save_round(job, result, sampled=cfg.policy > 0)


def gft(cfg: GFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef, *, res: Resources,
        engine: EngineConfig = EngineConfig(), seed: int = 0, threads: int = 1) -> list[ArtifactRef]:
    """All rounds; each round is its own cached stage, so a rerun resumes after the last finished round."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = gft_round(cfg, r, prompts, teacher, prev, engine, seed, threads, res=res)
        refs.append(prev)
    return refs


@stage("model", datasets={"groups.parquet": "training"})
def grpo_round(job: Job, cfg: GRPOConfig, round_idx: int, prompts: ArtifactRef, reference: ArtifactRef | None,
               prev: ArtifactRef, engine: EngineConfig = EngineConfig(), seed: int = 0,
               threads: int = 1) -> dict[str, float]:
    """One GRPO round from `prev` (`rounds.grpo.run_round`); `reference` (the checkpoint the GRPO stage started
    from) scores the KL term and is passed only when beta > 0. Optimizer state continues from the previous GRPO
    round only: round 0 starts a fresh optimizer even when `prev` (an SFT or GFT output) carries a state/."""
    if cfg.beta > 0 and reference is None:  # before anything is loaded
        raise ValueError(f"grpo_round: beta={cfg.beta} needs the reference checkpoint of the KL term")
    pool = _read_parquet(prompts, "train.parquet").iloc[: cfg.prompt_pool]  # all of them when None
    rows = round_prompts(pool, cfg.prompts_per_round, round_idx, seed)
    tok = chat.load_tokenizer(model_dir(prev), trust_remote_code=engine.trust_remote_code)
    phase = _round_phase(job, "grpo_round", cfg, round_idx, prev, resume=round_idx > 0,
                         trust_remote_code=engine.trust_remote_code, threads=threads,
                         reference=reference if cfg.beta > 0 else None)

    def train(prompt_ids: list[list[int]], table: pd.DataFrame) -> grpo_lib.Trained:
        with job.res.training():  # the policy's HF engine is released: the trainer loads its own copy
            done = phase(prompt_ids, table)
        return grpo_lib.Trained(behaviour=done.behaviour, history=done.history)

    result = grpo_lib.run_round(train, job.res.engine("policy", model_dir(prev), engine),
                                [job.res.verifier(r) for r in cfg.rewards], rows, tok, cfg, round_idx=round_idx)
    return _save_round(job, result)


def grpo(cfg: GRPOConfig, prompts: ArtifactRef, init: ArtifactRef, *, res: Resources,
         engine: EngineConfig = EngineConfig(), seed: int = 0, threads: int = 1) -> list[ArtifactRef]:
    """All rounds from `init` (also the KL reference when beta > 0); each round is its own cached stage."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = grpo_round(cfg, r, prompts, init if cfg.beta > 0 else None, prev, engine, seed, threads, res=res)
        refs.append(prev)
    return refs


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def prepare_benchmark_inputs(bench: BenchmarkConfig, data: DataConfig) -> tuple[str, DataConfig, ArtifactRef | None]:
    """The arguments of prepare_benchmark for one benchmark of a run whose prompt set is `data`: its name, the
    settings that read it, and its local source's content reference (None for a hub id)."""
    cfg = bench.data_config(data)
    return bench.name, cfg, data_lib.source_ref(cfg)


@stage("prompts", datasets={"eval.parquet": "evaluation"})
def prepare_benchmark(job: Job, benchmark: str, cfg: DataConfig, source: ArtifactRef | None) -> dict[str, float]:
    """Load and validate one named benchmark's rows (`BenchmarkConfig.data_config`) into eval.parquet, every row in
    source order; `source` is its local file's content reference (`data_lib.source_ref`), None for a hub id (its
    revision is in `cfg`). An empty benchmark is refused here, naming it."""
    if source != data_lib.source_ref(cfg):
        raise ValueError(f"prepare_benchmark {benchmark}: source must be the content reference of {cfg.source!r}")
    prompts = _load_prompt_set(job.res, cfg, None)
    if not prompts.rows:
        raise ValueError(f"benchmark {benchmark!r}: {cfg.source} has no usable rows")
    data_lib.write_prompts_parquet(prompts.rows, job.out / "eval.parquet")
    _write_json(job.out / "report.json", {"benchmark": benchmark, **prompts.report.to_dict()})
    return {"eval_prompts": float(len(prompts.rows)), "skipped_rows": float(prompts.report.skipped)}


@stage("eval", datasets={"samples.parquet": "evaluation"})
def evaluate(job: Job, cfg: EvalConfig, prompts: ArtifactRef, model: ArtifactRef, base: ArtifactRef,
             engine: EngineConfig = EngineConfig(), threads: int = 1) -> dict[str, float]:
    """Held-out mean@k, pass@k, greedy accuracy, entropy and KL(base || policy) (`rounds.evaluate.evaluate`):
    metrics.json, samples.parquet. With `cfg.validation`, also `val/*` metrics on the validation prompts."""
    tok = chat.load_tokenizer(model_dir(model), trust_remote_code=engine.trust_remote_code)
    models = eval_lib.Models(model_dir(model), model_dir(base), same=model.sha256 == base.sha256,
                             trust_remote_code=engine.trust_remote_code)
    test = eval_lib.Split(_read_parquet(prompts, "eval.parquet"), str(Path(prompts.uri) / "eval.parquet"))
    validation = eval_lib.Split(_read_parquet(prompts, "validation.parquet"),
                                str(Path(prompts.uri) / "validation.parquet")) if cfg.validation else None
    result = eval_lib.evaluate(cfg, models, job.res.engine("eval", model_dir(model), engine),
                               lambda: job.res.engine("base", model_dir(base), engine), job.res.verifier(cfg.reward),
                               tok, test, validation)
    job.res.count("engine.generate", result.generate_calls)
    result.samples.to_parquet(job.out / "samples.parquet")
    _write_json(job.out / EVAL_METRICS, result.metrics)
    return result.metrics
