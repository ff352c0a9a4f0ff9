"""Which settings enter a stage's key: every field of every schema is classified here, once.

A field either can change what a stage writes (OUTPUT: its value is hashed into the key of every stage that takes
its schema) or only changes how the run goes (RUN_ONLY: where processes meet, how long a job may take, how much
memory an engine reserves, what is logged or kept on disk afterwards), with the reason it cannot change the
output. A run-only field is left out of the stage key (`Settings.key_fields`), so raising a timeout or moving a
finished chain to another host serves its outputs instead of recomputing them. Anything that can change float
rounding is OUTPUT: processes, nodes, strategy, dtypes, batch and chunk sizes, compilation, attention kernels,
torch threads. `tests/unit/test_settings_fields.py` fails on a field of any schema that is classified nowhere or twice.
"""

from __future__ import annotations

__all__ = ["OUTPUT", "RUN_ONLY"]

OUTPUT: dict[str, tuple[str, ...]] = {
    "LaunchConfig": ("processes", "nodes", "job", "strategy", "cpu_offload"),
    "TrainConfig": ("lr", "weight_decay", "betas", "adam_eps", "max_grad_norm", "schedule", "warmup_steps",
                    "num_steps", "epochs", "sequences_per_step", "micro_batch_size", "packing", "micro_batch_tokens",
                    "logprob_chunk_size", "keep_logits", "precision", "save_dtype", "master_dtype", "launch",
                    "gradient_checkpointing", "compile", "compile_scope", "packed_attention", "seed"),
    "SamplingConfig": ("temperature", "top_p", "max_new_tokens", "seed"),
    "EngineConfig": ("backend", "dtype", "batch_size", "hf_cache", "hf_compile", "hf_decode", "max_model_len",
                     "tensor_parallel_size", "data_parallel_size", "enforce_eager", "trust_remote_code"),
    "DataConfig": ("source", "format", "split", "revision", "id_column", "ids", "prompt_column", "solution_column",
                   "answer_column", "answer_format", "solution_format", "teacher_column", "system_prompt",
                   "prompt_template", "max_prompts", "eval_fraction", "validation_fraction", "seed", "synthetic_rows",
                   "max_prompt_chars", "on_bad_row"),
    "ModelsConfig": ("base", "teacher"),
    "SyntheticConfig": ("seed", "n_train", "n_eval", "levels", "teacher_steps", "base_steps", "base_accuracy",
                        "probe_every", "n_dev", "lr", "warmup_steps", "batch_size"),
    "TeacherSampleConfig": ("k", "sampling"),
    "SFTConfig": ("source", "loss", "max_response_tokens", "train"),
    "GFTConfig": ("rounds", "prompts_per_round", "expert", "teacher", "policy", "tau", "entropy_coeff",
                  "advantage_scale", "advantage_baseline", "minibatches_per_round", "aggregation",
                  "score_at_temperature", "max_response_tokens", "sampling", "reward", "train"),
    "GRPOConfig": ("rounds", "prompts_per_round", "prompt_pool", "num_generations", "advantage_scale",
                   "advantage_eps", "advantage_baseline", "singleton_advantage", "multi_objective_aggregation",
                   "eps_low", "eps_high", "dual_clip", "importance_sampling_level", "beta", "kl_estimator",
                   "kl_clamp", "entropy_coeff", "aggregation", "num_iterations", "minibatches_per_round",
                   "max_response_tokens", "sampling", "rewards", "reward_weights", "sampler_correction",
                   "sampler_correction_max", "sampler_correction_min", "score_at_temperature", "train"),
    "EvalConfig": ("k", "sampling", "max_prompts", "kl_samples", "reward", "validation", "benchmarks"),
    "BenchmarkConfig": ("name", "source", "format", "split", "revision", "id_column", "prompt_column",
                        "answer_column", "answer_format", "prompt_template", "system_prompt", "max_prompts", "k",
                        "sampling", "reward"),
    "TrackingConfig": (),
    "RetentionConfig": (),
    "MemoryConfig": (),
    # threads: a float sum differs at 1 and 2 threads (tests/unit/test_threads.py): every torch stage takes it as an argument
    "RunConfig": ("seed", "threads", "chain", "data", "synthetic", "models", "engine", "teacher_sample", "sft", "gft",
                  "grpo", "eval"),
}
"""Schema class name -> the fields that can change what a stage writes (hashed into its key)."""

_TRACKING = "where and how the run is reported to MLflow; no stage reads it"

RUN_ONLY: dict[str, dict[str, str]] = {
    "LaunchConfig": {
        "rdzv_endpoint": "the address where the nodes of a job meet; the processes and their ranks are the same",
        "rdzv_id": "the prefix of the rendezvous id, only keeps consecutive jobs apart",
        "timeout_s": "when a stuck job is stopped; a job that finishes trains the same steps",
    },
    "TrainConfig": {
        "save_every": "resumable work checkpoints outside the output; a resume continues bit for bit",
        "keep_checkpoints": "how many work checkpoints stay on disk, outside the output",
        "log_every": "how often metrics are reported to the tracker; history.jsonl keeps every step",
    },
    "EngineConfig": {
        "gpu_memory_utilization": "vLLM's memory budget for weights and KV cache; samples are seeded per prompt",
        "enable_sleep_mode": "engines offload their weights while a job trains and wake with the same weights",
        "kv_cache_gib": "vLLM's KV cache size on CPU; samples are seeded per prompt",
    },
    "TrackingConfig": {name: _TRACKING for name in ("enabled", "uri", "experiment", "ui_url", "registered_model",
                                                    "alias")},
    "RetentionConfig": {
        "state": "what a finished round keeps on disk after its successor is published; no stage reads it",
        "model_every": "which finished rounds keep model/ after their successor is published; no stage reads it",
    },
    "MemoryConfig": {
        "cpu_gb": "a budget the plan is checked against before the run; a run that fits computes the same outputs",
        "gpu_gb": "a budget the plan is checked against before the run; a run that fits computes the same outputs",
    },
    "RunConfig": {
        "memory": "memory budgets checked before the run (not part of any stage key)",
        "name": "the run's folder under reports/ and its MLflow experiment; stage outputs are shared by key",
        "root": "where the store is; a moved root keeps its keys",
        "tracking": "MLflow reporting (not part of any stage key)",
        "retention": "disk use after a round is published (not part of any stage key)",
        "reward_modules": "which modules a reward may come from, checked at load; the reward is named by its stage",
    },
}
"""Schema class name -> {run-only field: why it cannot change what a stage writes}."""
