"""Settings of the data and the models a run starts from: the prompt set and its column mapping (`DataConfig`),
the base and teacher (`ModelsConfig`), and the built-in task with its bootstrap models (`SyntheticConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Settings

__all__ = ["DataConfig", "ModelsConfig", "SyntheticConfig"]


class DataConfig(Settings):
    """Where the prompt set comes from and how its columns map onto the pipeline's schema."""

    source: str = "synthetic"
    """"synthetic" (the built-in task), a Hugging Face dataset id, a `save_to_disk` folder, a .parquet or a .jsonl."""
    format: Literal["auto", "hf", "disk", "parquet", "jsonl"] = "auto"
    """How to read `source`; auto decides from the path (folder, suffix) or treats it as a hub id."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    revision: str | None = None
    """Hub datasets: the git revision to read (a commit sha pins the content; None: the default branch)."""
    id_column: str | None = "id"
    """Column holding a unique row id (with `ids = "column"`); None numbers the rows ("row-<i>"), as ids = "row"
    does. Every *_column is a column name or a path into nested fields: `extra_info.index`, `messages[0].content`,
    `prompt[-1].content`."""
    ids: Literal["column", "content", "row"] = "column"
    """Where row ids come from. column: `id_column`. content: the problem text itself, "sha-" and 16 hex digits of
    the sha256 of the prompt column's value (before prompt_template and system_prompt, so a new template keeps
    the split); stable when rows are added, removed or reordered; two rows with the same problem text are
    duplicates (the second is a bad row). row: the position in the source, "row-<i>" (changes when rows are
    inserted before it). Real GSM8K has no id column: ids = "content"."""
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

    @model_validator(mode="after")
    def _one_source_of_ids(self) -> DataConfig:
        if self.ids != "column" and self.id_column not in (None, "id"):
            raise ValueError(f"data.ids = {self.ids!r} takes ids from the "
                             f"{'problem text' if self.ids == 'content' else 'row positions'}, but data.id_column = "
                             f"{self.id_column!r} names an id column: keep one of the two")
        return self


class ModelsConfig(Settings):
    """Which models the run starts from."""

    base: str = "bootstrap"
    """The policy's starting point: "bootstrap" (the embedded default's base), a hub id or a local folder."""
    teacher: str | None = "bootstrap"
    """The teacher that writes teacher responses: "bootstrap", a hub id, a folder, or None to use a dataset column."""


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
