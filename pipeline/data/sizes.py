"""What the memory plan (`pipeline.memory.plan`) needs from the run's models and data before anything is
computed: the models' shapes (their config.json; the bootstrap models' from the synthetic task's own builder) and
the longest rendered prompt (of the prepared splits, else of the data source's rows)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.data import chat
from pipeline.memory.plan import MemoryPlan, Shapes, plan_run
from pipeline.memory.shapes import ModelShape, read_shape, shape_from_config

__all__ = ["memory_plan", "model_shapes", "prompt_tokens"]

log = logging.getLogger(__name__)


def memory_plan(cfg: RunConfig, calls: Sequence[Any], prompts: str | None, *,
                keep_engines: bool = False) -> MemoryPlan | None:
    """The memory plan of the run's bound stage calls (`pipeline.run.plan`'s), `prompts` the prepare_data output
    folder when it exists; None, logged, where a model's config.json cannot be read here."""
    import torch

    try:
        shapes = model_shapes(cfg)
    except (OSError, ValueError) as exc:
        log.warning("no memory plan: %s", exc)
        return None
    return plan_run(cfg, calls, shapes, cuda=torch.cuda.is_available(), prompt_tokens=prompt_tokens(cfg, prompts),
                    keep_engines=keep_engines)


def model_shapes(cfg: RunConfig) -> Shapes:
    """The base's and teacher's shapes from their config.json; the bootstrap models' from the synthetic task's
    own builder (they exist only once their stage ran)."""
    from pipeline.data import synthetic

    def bootstrap(role: str) -> ModelShape:
        model = synthetic.build_model(synthetic.build_tokenizer(), size=role, seed=0)
        return shape_from_config(model.config.to_dict())

    def shape(spec: str, role: str) -> ModelShape:
        if spec == "bootstrap":
            return bootstrap(role)
        folder = Path(spec)
        if not folder.is_dir():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
            if not isinstance(cached, str):
                raise ValueError(f"models.{role} = {spec!r}: its config.json is not in the local HF cache")
            folder = Path(cached).parent
        return read_shape(folder)

    teacher = None if cfg.models.teacher is None else shape(cfg.models.teacher, "teacher")
    bootstrapped = "bootstrap" in (cfg.models.base, cfg.models.teacher)
    return Shapes(base=shape(cfg.models.base, "base"), teacher=teacher,
                  bootstrap=bootstrap("base") if bootstrapped else None)


def prompt_tokens(cfg: RunConfig, prompts: str | None) -> int | None:
    """The longest rendered prompt, in the base's tokens: of the train and eval splits in the folder `prompts`
    (prepare_data's output) when it exists, else of the source's rows (the synthetic task's candidates, or a
    local file's validated rows: a superset of the splits); None where neither can be read here (a hub dataset:
    engine.max_model_len bounds it)."""
    from pipeline.data import synthetic

    base = cfg.models.base
    tok = synthetic.build_tokenizer() if base == "bootstrap" else chat.load_tokenizer(
        base, trust_remote_code=cfg.engine.trust_remote_code)
    texts = _split_prompts(prompts) if prompts is not None else _source_prompts(cfg)
    return max((len(chat.render_prompt(tok, t)) for t in texts), default=None) if texts else None


def _split_prompts(prompts: str) -> list[str]:
    import pyarrow.parquet as pq

    return [p for split in ("train.parquet", "eval.parquet")
            for p in pq.read_table(Path(prompts) / split, columns=["prompt"]).column("prompt").to_pylist()]


def _source_prompts(cfg: RunConfig) -> list[str] | None:
    """The templated prompts of the data source's rows, read without the gold check (None: a hub dataset, or
    rows that do not validate: prepare_data names the problem when it runs)."""
    from pipeline.data import prompts as data_lib
    from pipeline.data import sources, synthetic

    data = cfg.data
    try:
        if data.source == "synthetic":
            candidates = synthetic.make_problems(4 * data.synthetic_rows, seed=cfg.synthetic.seed + 1,
                                                 levels=cfg.synthetic.levels)  # what prepare_data draws from
            rows = data_lib.rows_from_records(candidates, data).rows
        elif sources.resolve_format(data) == "hf":
            return None
        else:
            rows = data_lib.load_prompts(data).rows
    except (ValueError, OSError) as exc:
        log.info("memory plan: prompt lengths bounded by engine.max_model_len (%s)", exc)
        return None
    return [r["prompt"] for r in rows]
