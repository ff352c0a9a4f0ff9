"""Settings of training: the optimizer, schedule, batching and checkpointing of one run (`TrainConfig`), and
where it runs (`LaunchConfig`: in the stage's process or as a torchrun job)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Settings

__all__ = ["LaunchConfig", "TrainConfig", "reject_round_owned"]


class LaunchConfig(Settings):
    """Where a stage's training phase runs: in the stage's own process, or as a torchrun job of several processes."""

    processes: int = Field(1, ge=1)
    """Training processes on each node. 1 on 1 node: in the stage's process (the default); more: the stage
    launches a torchrun job of nodes x processes data-parallel processes (DDP through accelerate; gloo on CPU,
    NCCL on GPUs), which reads its inputs from files, trains and writes the checkpoint into the stage's output
    folder (docs/scale.md)."""
    nodes: int = Field(1, ge=1)
    """Machines the job spans. More than 1: the stage's machine runs the first torchrun agent and hosts the c10d
    rendezvous at `rdzv_endpoint`; every other node runs `gft follow RUN_ROOT`,
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
    speed. It needs a GPU: a launched job refuses it before starting on a machine without one (FSDP2's
    offload has no accelerator to move the shards to)."""
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
ROUND_OWNED = ("num_steps", "epochs", "sequences_per_step", "save_every", "keep_checkpoints", "log_every")


def reject_round_owned(section: str, train: TrainConfig, instead: str) -> None:
    """Raise if `train` sets a field the round loop replaces: a value there would silently do nothing."""
    for name in ROUND_OWNED:
        value, default = getattr(train, name), TrainConfig.model_fields[name].default
        if value != default:
            raise ValueError(f"{section}.train.{name} = {value!r} has no effect in {section} rounds (leave it at "
                             f"{default!r}): {instead}; every round saves one checkpoint and logs every step")

