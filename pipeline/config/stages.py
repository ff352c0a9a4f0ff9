"""Settings of each stage: teacher sampling, SFT, GFT and GRPO rounds, evaluation. The round stages take their
step count and batch from their own fields (`pipeline.config.training.reject_round_owned`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Settings
from pipeline.config.data import DataConfig
from pipeline.config.rollout import SamplingConfig
from pipeline.config.training import TrainConfig, reject_round_owned

__all__ = ["TeacherSampleConfig", "SFTConfig", "GFTConfig", "GRPOConfig", "HELDOUT", "BenchmarkConfig", "EvalConfig"]


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
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    """The released code's loss_agg_mode (verl's), over the optimizer step (docs/design.md 1.5): sum / tokens;
    mean of sequence means; sum / sequences; sum / max_response_tokens."""
    score_at_temperature: bool = False
    """Score log p, C(p) and the entropy at softmax(logits / sampling.temperature), as verl and TRL score, instead
    of the raw distribution (temperature 1, the default; the paper's script samples at 1, where both agree). The
    released code takes log p at T but C(p) at 1 (docs/design.md 1.7). GFT has no sampler log-probs to compare."""
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
        reject_round_owned("gft", self.train, "the run takes rounds x minibatches_per_round optimizer steps, "
                            "each on 1/minibatches_per_round of the round's responses")
        return self

    @model_validator(mode="after")
    def _temperature_to_score_at(self) -> GFTConfig:
        _check_score_temperature("gft", self.score_at_temperature, self.sampling)
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
    """Prompts per round."""
    prompt_pool: int | None = Field(None, ge=1)
    """Draw the rounds' prompts from the first `prompt_pool` training prompts only (None: all of them)."""
    num_generations: int = Field(8, ge=2)
    """Group size G: completions per prompt."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """TRL's scale_rewards: divide R - b by the group's std, the round's std (batch), or nothing (Dr.GRPO)."""
    advantage_eps: float = Field(1e-6, gt=0)
    """eps of A = (R - b) / (std + eps) (verl's 1e-6)."""
    advantage_baseline: Literal["mean", "leave_one_out"] = "mean"
    """mean: the group mean (GRPO); leave_one_out: the mean of the other members (RLOO)."""
    singleton_advantage: Literal["zero", "reward"] = "zero"
    """A group with one scored completion: zero = A = 0 (TRL); reward = A = R (verl's singleton rule)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Several rewards: weighted sum, then group advantages; or each normalized in its group, summed, and
    normalized over the batch (GDPO; needs advantage_scale "group" and advantage_baseline "mean")."""
    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip: the ratio is clipped below at 1 - eps_low (TRL's epsilon)."""
    eps_high: float = Field(0.28, ge=0)
    """Upper clip: the ratio is clipped above at 1 + eps_high (DAPO's clip-higher; TRL: epsilon, 0.2)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual clip c: a negative advantage's loss is at most -c A (verl's clip_ratio_c; TRL's delta); None: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token = the ratio pi / pi_old per token (GRPO); sequence = GSPO's exp(mean_t log(pi / pi_old))."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL to the frozen reference (the checkpoint GRPO started from); 0 loads no reference."""
    kl_estimator: Literal["k1", "k2", "abs", "k3"] = "k3"
    """verl's kl_loss_type, d = log pi_ref - log pi: k1 = -d, k2 = d^2 / 2, abs = |d|, k3 = exp(d) - d - 1."""
    kl_clamp: float | None = Field(None, gt=0)
    """k3 only: clamp k3 to [-kl_clamp, kl_clamp] and d to [-20, 20] (verl's low_var_kl); None: no clamp."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Entropy bonus: c * H per token is subtracted from the loss (verl's entropy_coeff)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                         "dr_grpo"] = "token-mean"
    """verl's loss_agg_mode over the optimizer step (docs/design.md 1.7): sum / tokens; mean of sequence means;
    sum / sequences; sum / max_response_tokens; sum / (sequences x max_response_tokens)."""
    num_iterations: int = Field(1, ge=1)
    """Passes over each round's rollouts (TRL's num_iterations, mu)."""
    minibatches_per_round: int = Field(1, ge=1)
    """Optimizer steps per pass over the round's rollouts, each on an equal share of them."""
    max_response_tokens: int = Field(128, ge=1)
    """Completions stop at this many tokens (TRL's max_completion_length); overrides sampling.max_new_tokens."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=128)
    """How completions are sampled (seeded per round). Away from temperature 1, set score_at_temperature: the
    trainer otherwise scores the untempered policy on tempered samples."""
    score_at_temperature: bool = False
    """Score the new, old and reference log-probs and the entropy at softmax(logits / sampling.temperature), as verl
    and TRL do, instead of the raw distribution (temperature 1, the default). The engines report raw log-probs
    (vLLM's raw_logprobs; the HF engine's recorder), so at T != 1 the sampler comparison (sampling/*, the
    sampler correction's rho) scores the trainer once more at temperature 1 and compares raw with raw; TRL
    compares tempered with tempered (vLLM processed_logprobs, which also renormalize over top_p)."""
    rewards: tuple[str, ...] = Field(("math_answer",), min_length=1)
    """Reward functions by name or `module:function` (TRL's reward_funcs); one may return None for a row."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward (TRL's reward_weights; None: all 1), summed over the rewards that apply."""
    sampler_correction: Literal["none", "token_truncate", "sequence_truncate", "token_mask",
                                "sequence_mask"] = "token_truncate"
    """Correction of the sampler/trainer mismatch rho = pi_trainer / pi_sampler per token or sequence (TRL's
    vllm_importance_sampling_mode): *_truncate clamps rho to [min, max], *_mask zeroes it outside."""
    sampler_correction_max: float = Field(3.0, ge=1)
    """Upper bound of rho (TRL's vllm_importance_sampling_clip_max)."""
    sampler_correction_min: float | None = Field(None, ge=0, le=1)
    """Lower bound of rho (TRL's vllm_importance_sampling_clip_min); None: none."""
    train: TrainConfig = TrainConfig(lr=1e-6, micro_batch_size=64)
    """Optimizer settings; the step count and batch follow from rounds, minibatches_per_round and
    num_iterations (the round-owned fields stay at their defaults)."""

    @model_validator(mode="after")
    def _round_owns_batching(self) -> GRPOConfig:
        reject_round_owned("grpo", self.train, "the run takes rounds x num_iterations x minibatches_per_round "
                            "optimizer steps, each on 1/minibatches_per_round of the round's completions")
        return self

    @model_validator(mode="after")
    def _weights_match(self) -> GRPOConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} "
                             f"rewards {list(self.rewards)}")
        return self

    @model_validator(mode="after")
    def _options_consistent(self) -> GRPOConfig:
        if self.dual_clip is not None and self.dual_clip <= 1 + self.eps_high:
            raise ValueError(f"dual_clip = {self.dual_clip} must exceed 1 + eps_high = {1 + self.eps_high}")
        _check_score_temperature("grpo", self.score_at_temperature, self.sampling)
        if self.kl_clamp is not None and self.kl_estimator != "k3":
            raise ValueError(f"kl_clamp applies to kl_estimator 'k3' (verl's low_var_kl), not {self.kl_estimator!r}")
        if self.multi_objective_aggregation == "normalize_then_sum" and (
                self.advantage_scale != "group" or self.advantage_baseline != "mean"):
            raise ValueError("multi_objective_aggregation 'normalize_then_sum' normalizes by group and batch stds "
                             "itself: leave advantage_scale = 'group' and advantage_baseline = 'mean'")
        return self


def _check_score_temperature(stage: str, on: bool, sampling: SamplingConfig) -> None:
    if on and sampling.temperature == 0:
        raise ValueError(f"{stage}.score_at_temperature needs {stage}.sampling.temperature > 0: greedy decoding (0) "
                         "has no tempered distribution to score")


HELDOUT = "heldout"
"""The benchmark source (and default name) of the run's own held-out split (`data.eval_fraction`)."""


class BenchmarkConfig(Settings):
    """One named evaluation set: where its prompts come from, how its columns map, and how it is graded."""

    name: str = Field(HELDOUT, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The benchmark's name in metrics (`eval/<checkpoint>/<name>/mean@k`), tables and MLflow."""
    source: str = HELDOUT
    """"heldout" (the run's held-out split), a .jsonl, .parquet, a `save_to_disk` folder, or a hub dataset id."""
    format: Literal["auto", "hf", "disk", "parquet", "jsonl"] = "auto"
    """How to read `source` (as `data.format`)."""
    split: str = "test"
    """Split of a hub dataset or a DatasetDict folder."""
    revision: str | None = None
    """Hub datasets: the git revision (a commit sha pins the content; None: the default branch)."""
    id_column: str | None = None
    """Column holding a unique row id; None numbers the rows in source order ("row-<i>")."""
    prompt_column: str = "prompt"
    """Column (or path, as in `data`) holding the problem text."""
    answer_column: str = "answer"
    """Column (or path) holding the gold answer, or a whole solution whose last \\boxed{} is the answer."""
    answer_format: Literal["text", "gsm8k"] = "text"
    """text: the column as it is; gsm8k: the text after its last "####" marker."""
    prompt_template: str | None = None
    """The user turn, "{prompt}" replaced by the problem text; None: the run's `data.prompt_template`."""
    system_prompt: str | None = None
    """A system turn before every prompt; None: the run's `data.system_prompt`."""
    max_prompts: int | None = Field(None, ge=1)
    """Grade at most this many prompts (the first ones, in source order); None: `eval.max_prompts`."""
    k: int | None = Field(None, ge=1)
    """Samples per prompt for mean@k and pass@k; None: `eval.k`."""
    sampling: SamplingConfig | None = None
    """How the k samples are drawn; None: `eval.sampling`."""
    reward: str | None = None
    """The verifier, by name or `module:function`; None: `eval.reward`."""

    @model_validator(mode="after")
    def _heldout_is_the_split(self) -> BenchmarkConfig:
        if self.source == HELDOUT and self.name != HELDOUT:
            raise ValueError(f"benchmark {self.name!r}: source \"heldout\" is the run's held-out split, named "
                             f"\"heldout\" (name it so, or give the benchmark its own source)")
        if self.name == HELDOUT and self.source != HELDOUT:
            raise ValueError(f"benchmark name \"heldout\" is the run's held-out split; name {self.source!r} otherwise")
        if self.prompt_template is not None and self.prompt_template.count("{prompt}") != 1:
            raise ValueError(f"benchmark {self.name!r}: prompt_template must contain {{prompt}} exactly once")
        return self

    def data_config(self, data: DataConfig) -> DataConfig:
        """The prompt-set settings that read this benchmark: its source and columns, the run's template, system
        prompt and row checks where it sets none. The answer column stands in as the solution (nothing trains on
        a benchmark); the split settings keep their defaults, so only what reads the benchmark is in its key."""
        return DataConfig(
            source=self.source, format=self.format, split=self.split, revision=self.revision,
            id_column=self.id_column, prompt_column=self.prompt_column, answer_column=self.answer_column,
            solution_column=self.answer_column, answer_format=self.answer_format, solution_format=self.answer_format,
            prompt_template=data.prompt_template if self.prompt_template is None else self.prompt_template,
            system_prompt=data.system_prompt if self.system_prompt is None else self.system_prompt,
            max_prompt_chars=data.max_prompt_chars, on_bad_row=data.on_bad_row)


class EvalConfig(Settings):
    """Evaluation of every checkpoint on the held-out split, or on named benchmarks."""

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
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    """Named benchmarks, each graded on every checkpoint (`[[eval.benchmarks]]` tables); empty: the held-out split
    alone. List `{ name = "heldout" }` to keep the held-out split beside the others."""

    @model_validator(mode="after")
    def _benchmark_names_unique(self) -> EvalConfig:
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.benchmarks: names must be unique, got {names}")
        if self.validation and names and HELDOUT not in names:
            raise ValueError(f"eval.validation = true grades the validation prompts beside the held-out split, but "
                             f"eval.benchmarks {names} leaves it out: add {{ name = \"heldout\" }}")
        return self

    def suite(self) -> tuple[BenchmarkConfig, ...]:
        """The benchmarks graded: the listed ones, or the held-out split alone."""
        return self.benchmarks or (BenchmarkConfig(name=HELDOUT),)

    def for_benchmark(self, bench: BenchmarkConfig) -> EvalConfig:
        """The settings one evaluation stage takes: this table with the benchmark's own k, sampling, prompt cap and
        verifier in place, without the benchmark list (adding a benchmark changes no other evaluation's key);
        validation prompts are graded with the held-out split only."""
        own = {name: getattr(bench, name) for name in ("k", "sampling", "max_prompts", "reward")
               if getattr(bench, name) is not None}
        return self.model_copy(update={**own, "benchmarks": (),
                                       "validation": self.validation and bench.source == HELDOUT})
