"""One function per stage: load -> run -> save, with the cache key derived from the stage's own arguments.

A stage is a function `name(job, *arguments)` registered with `@stage(kind, datasets=...)`. Its arguments are
settings, artifact references (by role: the argument's name) and scalars, so `bind` can derive the call's key
from them (`pipeline.store.cache.derive_spec`); a setting that changes what the stage writes is an argument and
therefore in the key. `execute` runs a bound call under the cache (`pipeline.runtime.cached`): a verified output
is served without work, anything missing or altered is recomputed. The registered name is also a plain
function: `stages.gft_round(cfg, 0, prompts, teacher, prev, res=res)`. Stages never pass models, engines or
DataFrames; engines and verifier processes are process-level resources kept in `Resources`. The work of a round
(sampling, rewards, advantages, optimizer steps) is `pipeline.rounds.gft.run_round` / `rounds.grpo.run_round`.

    prepare_data -> bootstrap_models -> teacher_sample -> sft ----------------> evaluate
                                                       \\-> gft_round x R ----> evaluate
    any checkpoint (base, SFT, GFT) -> grpo_round x R -----------------------> evaluate
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.algo.metrics import accuracy_metrics, kl_per_token
from pipeline.config import (
    DataConfig, EngineConfig, EvalConfig, GFTConfig, GRPOConfig, RetentionConfig, SFTConfig, SyntheticConfig,
    TeacherSampleConfig,
)
from pipeline.data import chat, synthetic
from pipeline.data import prompts as data_lib
from pipeline.model.batches import Example
from pipeline.model.checkpoint import load_state, save_state
from pipeline.model.loading import load_model, save_dtype
from pipeline.model.loop import fit, total_steps
from pipeline.model.scoring import dft_objective, score_responses, sft_objective
from pipeline.model.trainer import make_trainer, save_model
from pipeline.rounds import bootstrap as bootstrap_lib
from pipeline.rounds import gft as gft_lib
from pipeline.rounds import grpo as grpo_lib
from pipeline.rounds import launch
from pipeline.rounds.evaluate import grade_prompt
from pipeline.rounds.groups import RoundResult, off_policy, round_prompts
from pipeline.runtime import Resources, cached, model_dir
from pipeline.store.artifacts import ArtifactRef, StageStore, tree_sha256, write_text_atomic
from pipeline.store.cache import StageSpec, derive_spec
from pipeline.store.outputs import EVAL_METRICS, HISTORY

__all__ = ["Job", "StageCall", "STAGES", "bind", "execute", "prepare_data", "prepare_data_inputs", "bootstrap_models",
           "bootstrap_member", "teacher_sample", "sft", "gft_round", "gft", "grpo_round", "grpo", "evaluate"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# The stage table: bind a call, derive its key, execute it under the cache
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a running stage gets besides its arguments: its fresh output folder, its key, the resources."""

    out: Path
    key: str
    res: Resources


@dataclass(frozen=True)
class _Stage:
    fn: Callable[..., dict[str, float]]
    kind: str
    datasets: dict[str, str]


STAGES: dict[str, _Stage] = {}


@dataclass(frozen=True)
class StageCall:
    """One stage call: the stage, its bound arguments (signature order, defaults applied) and its spec, built once."""

    stage: str
    arguments: dict[str, Any]
    spec: StageSpec

    @property
    def key(self) -> str:
        return self.spec.key


def stage(kind: str, *, datasets: dict[str, str] | None = None):
    """Register `fn(job, ...) -> metrics` as a stage; the name becomes `fn(..., res=res) -> ArtifactRef`."""
    def register(fn: Callable[..., dict[str, float]]) -> Callable[..., ArtifactRef]:
        STAGES[fn.__name__] = _Stage(fn, kind, dict(datasets or {}))

        @functools.wraps(fn)
        def call(*args, res: Resources, **kw) -> ArtifactRef:
            return execute(bind(fn.__name__, *args, **kw), res)
        return call
    return register


def bind(name: str, *args, **kw) -> StageCall:
    """Bind arguments to stage `name` and derive the call's key from them (a wrong argument fails here)."""
    entry = STAGES[name]
    params = list(inspect.signature(entry.fn).parameters.values())[1:]  # without `job`
    bound = inspect.Signature(params).bind(*args, **kw)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    return StageCall(name, arguments, derive_spec(name, entry.kind, arguments, entry.datasets))


def execute(call: StageCall, res: Resources) -> ArtifactRef:
    """Serve the call's verified output or compute it (`pipeline.runtime.cached`)."""
    fn = STAGES[call.stage].fn
    return cached(res, call.spec, lambda out, key: fn(Job(out, key, res), **call.arguments))


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
def bootstrap_models(job: Job, synth: SyntheticConfig) -> dict[str, float]:
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
                   engine: EngineConfig = EngineConfig()) -> dict[str, float]:
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


def _sft_examples(tok, rows: pd.DataFrame, teachers: dict[str, list[str]], max_tokens: int) -> tuple[list[Example], int]:
    """Expert (and teacher) responses of every prompt as examples, and how many the budget cut."""
    examples, truncated = [], 0
    for pid, prompt, solution in zip(rows["id"], rows["prompt"], rows["solution"]):
        prompt_ids = chat.render_prompt(tok, prompt)
        members = off_policy(tok, str(pid), "expert", [solution], max_tokens)
        members += off_policy(tok, str(pid), "teacher", teachers.get(str(pid), []), max_tokens)
        truncated += sum(m.truncated for m in members)
        examples += [Example(prompt_ids, m.token_ids) for m in members]
    return examples, truncated


@stage("model")
def sft(job: Job, cfg: SFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef,
        trust_remote_code: bool = False) -> dict[str, float]:
    """Supervised fine-tuning on expert solutions (or SFT(mix), with `teacher`'s responses); model/, history."""
    rows = _read_parquet(prompts, "train.parquet")
    tok = chat.load_tokenizer(model_dir(init), trust_remote_code=trust_remote_code)
    teachers = _teacher_map(teacher, rows) if cfg.source == "mix" else {}
    examples, truncated = _sft_examples(tok, rows, teachers, cfg.max_response_tokens)
    work = job.res.store.work_dir("sft", job.key)  # outside the temp folder: a rerun resumes from it
    dtype = save_dtype(cfg.train.save_dtype, model_dir(init), trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    if cfg.train.launch.launched:
        history, full_history = _launched_sft(job, cfg, examples, init, work, dtype, trust_remote_code)
    else:
        model = load_model(model_dir(init), trust_remote_code=trust_remote_code, train=True,
                           master_dtype=cfg.train.master_dtype)
        result = fit(model, examples, sft_objective() if cfg.loss == "sft" else dft_objective(), cfg.train,
                     pad_id=chat.pad_id(tok), checkpoint_dir=work, progress_bar=job.res.progress)
        save_model(result.trainer, job.out / "model", tok, dtype=dtype)
        history, full_history = result.history, result.full_history
    train_s = time.perf_counter() - start
    job.res.count("optimizer.step", len(history))
    _write_history(job.out / HISTORY, full_history)  # with the steps before a resume
    return {"examples": float(len(examples)), "truncated_responses": float(truncated),
            "final_loss": full_history[-1]["loss"], **_train_perf(history, train_s)}


def _launched_sft(job: Job, cfg: SFTConfig, examples: list[Example], init: ArtifactRef, work: Path, dtype,
                  trust_remote_code: bool) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """SFT's training as a job of `cfg.train.launch.processes` processes (`rounds.launch`): model/ into the
    output folder, resuming from the same work checkpoints as in process."""
    folder = work / "job"
    folder.mkdir(parents=True, exist_ok=True)
    launch.write_examples(examples, folder / "examples.parquet")
    spec = launch.TrainJob(stage="sft", config=cfg.model_dump(mode="json"), model=model_dir(init), folder=str(folder),
                           out=str(job.out), save_dtype=str(dtype).removeprefix("torch."), checkpoint_dir=str(work),
                           trust_remote_code=trust_remote_code)
    with job.res.engines_asleep():  # a teacher engine may hold the GPUs the job trains on
        result = launch.run_job(spec, cfg.train.launch, steps=total_steps(cfg.train, len(examples)),
                                progress=job.res.progress)
    return result.history, result.full_history


def _train_perf(history: Sequence[dict[str, float]], seconds: float) -> dict[str, float]:
    """Training throughput of this call (model loading and checkpoints included), as the rounds log it."""
    tokens = sum(h.get("tokens", 0.0) for h in history)
    return {"perf/train_s": seconds, "perf/train_tokens": tokens, "perf/throughput": tokens / max(seconds, 1e-9),
            "perf/step_s": seconds / max(len(history), 1)}


# ---------------------------------------------------------------------------------------------------------
# GFT and GRPO rounds: load -> rounds.<algo>.run_round -> save
# ---------------------------------------------------------------------------------------------------------


def _round_trainer(job: Job, prev: ArtifactRef, train_cfg, steps: int, *, resume: bool, trust_remote_code: bool):
    """The trainer of a round: `prev`'s weights in `master_dtype`, its optimizer state when `resume` and it has one."""
    model = load_model(model_dir(prev), trust_remote_code=trust_remote_code, train=True,
                       master_dtype=train_cfg.master_dtype)
    trainer = make_trainer(model, train_cfg, total_steps=steps)
    if resume and (Path(prev.uri) / "state").is_dir():
        load_state(trainer, Path(prev.uri) / "state")
    return trainer


def _save_round(job: Job, trainer, tok, result: RoundResult, prev: ArtifactRef, train_cfg, *, trust_remote_code: bool,
                sampled: bool = True) -> dict[str, float]:
    """groups.parquet, history.jsonl, model/ (in train_cfg.save_dtype, "source" meaning `prev`'s) and state/ (float32
    weights, optimizer, scheduler, RNG: the next round continues from these, so a bf16 model/ loses nothing)."""
    dtype = save_dtype(train_cfg.save_dtype, model_dir(prev), trust_remote_code=trust_remote_code)
    result.table.to_parquet(job.out / "groups.parquet")
    _write_history(job.out / HISTORY, result.history)
    if trainer is not None:  # else a launched job wrote state/ and model/
        save_state(trainer, job.out / "state")
        save_model(trainer, job.out / "model", tok, dtype=dtype)
    job.res.count("optimizer.step", len(result.history))
    if sampled:
        job.res.count("engine.generate")
    return result.metrics


def retain(store: StageStore, ref: ArtifactRef, round_idx: int, cfg: RetentionConfig) -> int:
    """Prune a finished round whose successor is published: its `state/` unless every round keeps it, its `model/`
    unless it is an every-Nth round. Returns the bytes freed (the round's history and groups always stay)."""
    prefixes = ["state/"] if cfg.state == "last" else []
    if not (cfg.model_every and (round_idx + 1) % cfg.model_every == 0):
        prefixes.append("model/")
    freed = store.prune(ref, prefixes) if prefixes else 0
    if freed:
        log.info("round %d (%s): pruned %s, %.0f MiB freed", round_idx, ref.path.name[:12], prefixes, freed / 2**20)
    return freed


def resumable(store: StageStore, ref: ArtifactRef) -> bool:
    """Whether a round can be continued from `ref`: nothing of it pruned (any other reference: always)."""
    return not store.pruned(ref)


@stage("model", datasets={"groups.parquet": "training"})
def gft_round(job: Job, cfg: GFTConfig, round_idx: int, prompts: ArtifactRef, teacher: ArtifactRef | None,
              prev: ArtifactRef, engine: EngineConfig = EngineConfig(), seed: int = 0) -> dict[str, float]:
    """One GFT round from `prev` (`rounds.gft.run_round`): groups.parquet, model/, state/ and metrics."""
    rows = round_prompts(_read_parquet(prompts, "train.parquet"), cfg.prompts_per_round, round_idx, seed)
    tok = chat.load_tokenizer(model_dir(prev), trust_remote_code=engine.trust_remote_code)
    trainer, train = _gft_train_phase(job, cfg, round_idx, prev, tok, engine.trust_remote_code)
    result = gft_lib.run_round(train, job.res.engine("policy", model_dir(prev), engine), job.res.verifier(cfg.reward),
                               rows, _teacher_map(teacher, rows), tok, cfg, round_idx=round_idx)
    return _save_round(job, trainer, tok, result, prev, cfg.train, trust_remote_code=engine.trust_remote_code,
                       sampled=cfg.policy > 0)


def _gft_train_phase(job: Job, cfg: GFTConfig, round_idx: int, prev: ArtifactRef, tok, trust_remote_code: bool):
    """(trainer, train phase) of a round: a live trainer in this process, or (None, a launched job that reads the
    round's groups and writes model/ and state/ into the output folder)."""
    if not cfg.train.launch.launched:
        trainer = _round_trainer(job, prev, cfg.train, cfg.rounds * cfg.minibatches_per_round, resume=True,
                                 trust_remote_code=trust_remote_code)
        return trainer, functools.partial(gft_lib.train_phase, trainer, cfg=cfg, round_idx=round_idx,
                                          pad_id=chat.pad_id(tok))
    run_job = _round_job(job, "gft_round", cfg, round_idx, prev, steps=cfg.minibatches_per_round, resume=True,
                         trust_remote_code=trust_remote_code)
    return None, lambda prompt_ids, table: run_job(prompt_ids, table).history


def _round_job(job: Job, stage_name: str, cfg: GFTConfig | GRPOConfig, round_idx: int, prev: ArtifactRef, *,
               steps: int, resume: bool, trust_remote_code: bool, reference: ArtifactRef | None = None):
    """A round's training as a launched job: (prompt ids, group table) -> the job's result. The job starts from
    `prev`'s model/ (and its state/ when `resume`), writes model/ and state/ into the output folder, and runs
    while the engines in sleep mode sleep (they wake with their old weights; the next round loads ours)."""
    folder = job.res.store.work_dir(stage_name, job.key) / "job"
    dtype = save_dtype(cfg.train.save_dtype, model_dir(prev), trust_remote_code=trust_remote_code)
    state = Path(prev.uri) / "state"
    spec = launch.TrainJob(stage=stage_name, config=cfg.model_dump(mode="json"), model=model_dir(prev),
                           state=str(state) if resume and state.is_dir() else None, folder=str(folder),
                           reference=None if reference is None else model_dir(reference), out=str(job.out),
                           save_dtype=str(dtype).removeprefix("torch."), round_idx=round_idx,
                           trust_remote_code=trust_remote_code)

    def run_job(prompt_ids: list[list[int]], table: pd.DataFrame) -> launch.JobResult:
        folder.mkdir(parents=True, exist_ok=True)
        table.to_parquet(folder / "groups.parquet")
        write_text_atomic(folder / "prompt_ids.json", json.dumps(prompt_ids))
        with job.res.engines_asleep():
            return launch.run_job(spec, cfg.train.launch, steps=steps, progress=job.res.progress)
    return run_job


def gft(cfg: GFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef, *, res: Resources,
        engine: EngineConfig = EngineConfig(), seed: int = 0) -> list[ArtifactRef]:
    """All rounds; each round is its own cached stage, so a rerun resumes after the last finished round."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = gft_round(cfg, r, prompts, teacher, prev, engine, seed, res=res)
        refs.append(prev)
    return refs


@stage("model", datasets={"groups.parquet": "training"})
def grpo_round(job: Job, cfg: GRPOConfig, round_idx: int, prompts: ArtifactRef, reference: ArtifactRef | None,
               prev: ArtifactRef, engine: EngineConfig = EngineConfig(), seed: int = 0) -> dict[str, float]:
    """One GRPO round from `prev` (`rounds.grpo.run_round`); `reference` (the checkpoint the GRPO stage started
    from) scores the KL term and is passed only when beta > 0. Optimizer state continues from the previous GRPO
    round only: round 0 starts a fresh optimizer even when `prev` (an SFT or GFT output) carries a state/."""
    if cfg.beta > 0 and reference is None:  # before anything is loaded
        raise ValueError(f"grpo_round: beta={cfg.beta} needs the reference checkpoint of the KL term")
    pool = _read_parquet(prompts, "train.parquet").iloc[: cfg.prompt_pool]  # all of them when None
    rows = round_prompts(pool, cfg.prompts_per_round, round_idx, seed)
    remote = engine.trust_remote_code
    tok = chat.load_tokenizer(model_dir(prev), trust_remote_code=remote)
    trainer, train = _grpo_train_phase(job, cfg, round_idx, prev, reference if cfg.beta > 0 else None, tok, remote)
    result = grpo_lib.run_round(train, job.res.engine("policy", model_dir(prev), engine),
                                [job.res.verifier(r) for r in cfg.rewards], rows, tok, cfg, round_idx=round_idx)
    return _save_round(job, trainer, tok, result, prev, cfg.train, trust_remote_code=remote)


def _grpo_train_phase(job: Job, cfg: GRPOConfig, round_idx: int, prev: ArtifactRef, reference: ArtifactRef | None,
                      tok, trust_remote_code: bool):
    """(trainer, train phase) of a GRPO round: a live trainer (and reference model) in this process, or (None, a
    launched job whose processes score the old policy (`prev`) and the reference themselves, then train)."""
    steps = cfg.rounds * cfg.minibatches_per_round * cfg.num_iterations
    if not cfg.train.launch.launched:
        trainer = _round_trainer(job, prev, cfg.train, steps, resume=round_idx > 0,
                                 trust_remote_code=trust_remote_code)
        ref_model = None if reference is None else load_model(model_dir(reference), trust_remote_code=trust_remote_code)
        return trainer, functools.partial(grpo_lib.train_phase, trainer, cfg=cfg, round_idx=round_idx,
                                          pad_id=chat.pad_id(tok), reference=ref_model)
    run_job = _round_job(job, "grpo_round", cfg, round_idx, prev, steps=cfg.minibatches_per_round * cfg.num_iterations,
                         resume=round_idx > 0, trust_remote_code=trust_remote_code, reference=reference)

    def train(prompt_ids: list[list[int]], table: pd.DataFrame) -> grpo_lib.Trained:
        result = run_job(prompt_ids, table)
        return grpo_lib.Trained(behaviour=result.behaviour, history=result.history)
    return None, train


def grpo(cfg: GRPOConfig, prompts: ArtifactRef, init: ArtifactRef, *, res: Resources,
         engine: EngineConfig = EngineConfig(), seed: int = 0) -> list[ArtifactRef]:
    """All rounds from `init` (also the KL reference when beta > 0); each round is its own cached stage."""
    refs, prev = [], init
    for r in range(cfg.rounds):
        prev = grpo_round(cfg, r, prompts, init if cfg.beta > 0 else None, prev, engine, seed, res=res)
        refs.append(prev)
    return refs


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


@stage("eval", datasets={"samples.parquet": "evaluation"})
def evaluate(job: Job, cfg: EvalConfig, prompts: ArtifactRef, model: ArtifactRef, base: ArtifactRef,
             engine: EngineConfig = EngineConfig()) -> dict[str, float]:
    """Held-out mean@k, pass@k, greedy accuracy, entropy and KL(base || policy): metrics.json, samples.parquet.
    With `cfg.validation`, also `val/mean@k`, `val/pass@k` and `val/greedy_accuracy` on the validation prompts."""
    tok = chat.load_tokenizer(model_dir(model), trust_remote_code=engine.trust_remote_code)
    sampler = job.res.engine("eval", model_dir(model), engine)
    test = _grade(job.res, cfg, sampler, tok, prompts, "eval.parquet")
    metrics = accuracy_metrics(test.per_prompt, k=cfg.k)
    metrics.update(_entropy_and_kl(job.res, cfg, model, base, engine, test.prompt_ids, test.sampled, tok))
    if cfg.validation:
        val = _grade(job.res, cfg, sampler, tok, prompts, "validation.parquet")
        metrics.update({f"val/{name}": v for name, v in accuracy_metrics(val.per_prompt, k=cfg.k).items()})
    _samples_table(test.rows, test.sampled, test.greedy, test.per_prompt).to_parquet(job.out / "samples.parquet")
    _write_json(job.out / EVAL_METRICS, metrics)
    return metrics


@dataclass(frozen=True)
class _Graded:
    rows: pd.DataFrame
    prompt_ids: list[list[int]]
    sampled: list
    greedy: list
    per_prompt: list


def _grade(res: Resources, cfg: EvalConfig, sampler, tok, prompts: ArtifactRef, name: str) -> _Graded:
    """Sample k responses and a greedy one for (at most `cfg.max_prompts` of) the rows of the prompt set's `name`
    file, and grade them."""
    rows = _read_parquet(prompts, name)
    if rows.empty:
        raise ValueError(f"evaluate: no prompts to grade: {Path(prompts.uri) / name} has no rows")
    rows = rows.iloc[: cfg.max_prompts] if cfg.max_prompts else rows
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    sampled = sampler.generate(prompt_ids, cfg.k, cfg.sampling)
    greedy = sampler.generate(prompt_ids, 1, cfg.sampling.model_copy(update={"temperature": 0.0}))
    res.count("engine.generate", 2)
    verifier = res.verifier(cfg.reward)
    per_prompt = [grade_prompt(verifier, rec, [c.text for c in cs], g[0].text)
                  for rec, cs, g in zip(rows.to_dict("records"), sampled, greedy)]
    return _Graded(rows, prompt_ids, sampled, greedy, per_prompt)


def _entropy_and_kl(res: Resources, cfg: EvalConfig, model: ArtifactRef, base: ArtifactRef, engine: EngineConfig,
                    prompt_ids: list[list[int]], sampled, tok) -> dict[str, float]:
    remote, pad = engine.trust_remote_code, chat.pad_id(tok)
    policy = load_model(model_dir(model), trust_remote_code=remote)
    flat_p = [p for p, cs in zip(prompt_ids, sampled) for _ in cs]
    own = score_responses(policy, flat_p, [list(c.token_ids) for cs in sampled for c in cs], pad_id=pad)
    tokens = sum(e.numel() for e in own.entropy)
    out = {"entropy": sum(float(e.sum()) for e in own.entropy) / max(tokens, 1)}
    if cfg.kl_samples > 0 and model.sha256 == base.sha256:
        out["kl_base_policy"] = 0.0  # the base against itself: 0 by definition, no second sampling pass
    elif cfg.kl_samples > 0:
        base_samples = res.engine("base", model_dir(base), engine).generate(
            prompt_ids, cfg.kl_samples, cfg.sampling.model_copy(update={"temperature": 1.0}))
        res.count("engine.generate")
        bp = [p for p, cs in zip(prompt_ids, base_samples) for _ in cs]
        br = [list(c.token_ids) for cs in base_samples for c in cs]
        base_scores = score_responses(load_model(model_dir(base), trust_remote_code=remote), bp, br, pad_id=pad)
        out["kl_base_policy"] = kl_per_token(base_scores.logprobs, score_responses(policy, bp, br, pad_id=pad).logprobs)
    return out


def _samples_table(rows: pd.DataFrame, sampled, greedy, per_prompt) -> pd.DataFrame:
    return pd.DataFrame({
        "id": rows["id"].astype(str), "answer": rows["answer"].astype(str),
        "samples": [[c.text for c in cs] for cs in sampled], "rewards": [s.rewards for s in per_prompt],
        "greedy": [g[0].text for g in greedy], "greedy_reward": [s.greedy_reward for s in per_prompt],
    })
