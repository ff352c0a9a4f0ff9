"""Launched training (`train.launch.processes`): a run whose SFT and GFT rounds, or GRPO rounds, train as torchrun
jobs of 2 processes (gloo, on CPU) ends with the parameters of the same run trained in process, in float64 to 1e-10;
a failing job process fails the stage with that process's error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import apply_overrides, load_run_config

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"
F64 = {"master_dtype": "float64", "save_dtype": "float64"}


# Two GRPO rounds from the base (so the second continues the first's optimizer state), beta > 0 (the reference's
# log-probs) and 2 passes (the second's old log-probs differ from the current ones). The reward is the response's
# length (the base earns no math reward), and each pass is one step over all completions: a step whose
# completions all have advantage 0 would have for gradient only the float rounding of the KL of a policy that is
# still its reference, which AdamW scales up to a full-size step: 1 and 2 processes then part at 1e-8.
GRPO_CHAIN = {"chain": ["grpo"], "reward_modules": ["tests.reward_helpers"],
              "grpo.rewards": ["tests.reward_helpers:none_unless_long"],
              "grpo.rounds": 2, "grpo.prompts_per_round": 3, "grpo.num_generations": 3,
              "grpo.max_response_tokens": 16, "grpo.sampling.max_new_tokens": 16, "grpo.sampling.seed": 3,
              "grpo.minibatches_per_round": 1, "grpo.num_iterations": 2, "grpo.beta": 0.04,
              "grpo.train.lr": 1e-3, "grpo.train.micro_batch_size": 4}


def _config(processes: int, strategy: str = "ddp", sections=("sft", "gft"), train=None, **launch):
    overrides = {"tracking.enabled": False}
    for section in sections:
        overrides.update({f"{section}.train.{k}": v for k, v in {**F64, **(train or {})}.items()})
        overrides[f"{section}.train.launch.processes"] = processes
        overrides[f"{section}.train.launch.strategy"] = strategy
        overrides.update({f"{section}.train.launch.{k}": v for k, v in launch.items()})
    return apply_overrides(load_run_config(TINY), overrides)


def _weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ref.uri) / "model" / "model.safetensors"))


def test_one_process_launches_only_when_asked():
    from pipeline.config import LaunchConfig

    assert [LaunchConfig(**kw).launched for kw in ({}, {"job": True}, {"processes": 2})] == [False, True, True]


def test_cpu_offload_is_an_fsdp_setting_and_needs_a_gpu(tmp_path):
    """The setting is refused with any other strategy, and without a GPU before a process starts (FSDP2 offloads
    from the accelerator; CPU-only it fails inside the job with "Cannot access accelerator device")."""
    from pipeline.config import LaunchConfig
    from pipeline.rounds.job import TrainJob
    from pipeline.rounds.launch import run_job

    with pytest.raises(ValueError, match='cpu_offload offloads FSDP2 shards: it needs strategy = "fsdp"'):
        LaunchConfig(processes=2, cpu_offload=True)
    launch = LaunchConfig(processes=2, strategy="fsdp", cpu_offload=True)
    if not torch.cuda.is_available():
        job = TrainJob.model_construct(phase="sft", folder=str(tmp_path / "job"))
        with pytest.raises(ValueError, match="sft: train.launch.cpu_offload .* this machine has no GPU"):
            run_job(job, launch)
        assert not (tmp_path / "job").exists()  # refused before the job folder is written


@pytest.mark.slow
@pytest.mark.parametrize("strategy,launch", [
    ("ddp", {}), ("fsdp", {}),
    ("fsdp", {"train": {"gradient_checkpointing": True}}),  # activation checkpointing recomputes the same values
    pytest.param("fsdp", {"cpu_offload": True}, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="FSDP2's CPUOffloadPolicy needs a GPU to offload from"))],
    ids=["ddp", "fsdp", "fsdp-activation-checkpointing", "fsdp-cpu-offload"])
def test_two_processes_train_the_run_of_one(tmp_path, strategy, launch):
    from pipeline.run import run

    one = run(_config(1), root=tmp_path, progress=False)
    two = run(_config(2, strategy, **launch), root=tmp_path, progress=False)  # same root: data, models, teacher
    assert two.calls.get("prepare_data", 0) == 0 and one.refs["sft"].sha256 != two.refs["sft"].sha256
    for name in ("sft", "gft"):
        a, b = _weights(one.refs[name]), _weights(two.refs[name])
        assert a.keys() == b.keys() and all(t.dtype == torch.float64 for t in a.values())
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")
        print(f"{name} ({strategy}): max |2 processes - 1 process| = "
              f"{max((b[k] - a[k]).abs().max().item() for k in a):.2e}")
    for result, world in ((one, 1), (two, 2)):  # the rounds did train on that many processes
        progress = json.loads((Path(result.refs["gft"].uri) / "state" / "progress.json").read_text())
        assert progress["processes"] == world
    moved = _weights(one.refs["gft"])["model.embed_tokens.weight"] - _weights(one.refs["sft"])["model.embed_tokens.weight"]
    assert moved.abs().max() > 1e-6  # the GFT rounds trained: the comparison is not of two untouched copies
    assert not list(tmp_path.glob("*/.ckpt-*"))  # job folders go with the work folder once published


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_grpo_rounds_of_one(tmp_path, strategy):
    """Each launched GRPO round scores its old policy (`prev`) and the reference in every process, then trains:
    the same weights and behaviour metrics as in process."""
    from pipeline.run import run
    from pipeline.store.outputs import read_output

    one = run(apply_overrides(_config(1, sections=("grpo",)), GRPO_CHAIN), root=tmp_path, progress=False)
    two = run(apply_overrides(_config(2, strategy, sections=("grpo",)), GRPO_CHAIN), root=tmp_path, progress=False)
    a, b = _weights(one.refs["grpo"]), _weights(two.refs["grpo"])
    assert a.keys() == b.keys() and all(t.dtype == torch.float64 for t in a.values())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=key)
    print(f"grpo ({strategy}): max |2 processes - 1 process| = {max((b[k] - a[k]).abs().max().item() for k in a):.2e}")
    progress = json.loads((Path(two.refs["grpo"].uri) / "state" / "progress.json").read_text())
    assert progress["processes"] == 2 and progress["step"] == 4  # 2 rounds x 2 passes
    m1, m2 = read_output(one.refs["grpo"]).metrics, read_output(two.refs["grpo"]).metrics
    shared = [k for k in m1 if k.startswith(("sampling/", "kl", "ratio_mean", "clip_ratio/", "reward"))]
    assert "kl" in shared and "sampling/sampling_logp_difference/mean" in shared
    for key in shared:
        assert m2[key] == pytest.approx(m1[key], rel=1e-9, abs=1e-12), key
    history = [json.loads(line) for line in (Path(two.refs["grpo"].uri) / "history.jsonl").read_text().splitlines()]
    assert any(abs(h["ratio_mean"] - 1.0) > 1e-9 for h in history)  # later steps' old log-probs were not current
    assert not list(tmp_path.glob("*/.ckpt-*"))


def test_fsdp_processes_run_as_many_micro_batches():
    """FSDP2 gathers shards in every forward, so every process must run as many: a step of 9 sequences over 2
    processes at micro-batches of 4 is 2 micro-batches on each (5 = 2 + 3 and 4 = 2 + 2), not 2 and 1."""
    from pipeline.config import TrainConfig
    from pipeline.model.batches import Example, plan_step

    examples = [Example([1, 2], [3] * (i + 1)) for i in range(9)]
    counts = {}
    for strategy in ("ddp", "fsdp"):
        cfg = TrainConfig(micro_batch_size=4, launch={"processes": 2, "strategy": strategy})
        shares = [plan_step(examples, list(range(9)), cfg, rank=r, world=2, pad_id=0)[0] for r in (0, 1)]
        counts[strategy] = [[b.input_ids.shape[0] for b in share] for share in shares]
    assert counts == {"ddp": [[4, 1], [4]], "fsdp": [[2, 3], [2, 2]]}
    with pytest.raises(ValueError, match="fewer sequences"):
        plan_step(examples, list(range(9)), TrainConfig(micro_batch_size=1, launch={"processes": 2, "strategy": "fsdp"}),
                  rank=1, world=2, pad_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo_round"])
def test_a_failing_process_fails_the_stage_with_its_error(tmp_path, stage):
    from pipeline.config import GRPOConfig, LaunchConfig, SFTConfig
    from pipeline.rounds.job import TrainJob
    from pipeline.rounds.launch import TrainJobError, run_job

    config = (SFTConfig() if stage == "sft" else GRPOConfig(beta=0.04)).model_dump(mode="json")
    job = TrainJob(phase=stage, config=config, model=str(tmp_path / "no-such-model"), folder=str(tmp_path),
                   reference=None if stage == "sft" else str(tmp_path / "no-such-model"), out=str(tmp_path / "out"))
    with pytest.raises(TrainJobError, match=r"failed in process [01]: .*no-such-model") as err:
        run_job(job, LaunchConfig(processes=2, timeout_s=300))
    assert "full traceback" in str(err.value) and not (tmp_path / "result.json").exists()


def _workers(spec_part: str) -> list[int]:
    """Pids of the job's training processes (not torchrun itself), found by their command line in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.name.isdigit() and any(spec_part in c for c in cmd) and "torch.distributed.run" not in cmd:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_killed_worker_fails_the_stage_and_the_rerun_resumes_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.run import run
    from pipeline.store.outputs import read_output

    text = TINY.read_text().replace('chain = ["sft", "gft"]', 'chain = ["sft"]').replace(
        "train = { lr = 1e-3, num_steps = 2, sequences_per_step = 8, micro_batch_size = 8 }",
        'train = { lr = 1e-3, num_steps = 12, sequences_per_step = 8, micro_batch_size = 8, save_every = 1, '
        'master_dtype = "float64", save_dtype = "float64", launch = { processes = 2 } }') + "\n[tracking]\nenabled = false\n"
    config = tmp_path / "sft2.toml"
    config.write_text(text)
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--root", str(root), "--no-progress", "--in-process"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # keep_checkpoints = 1: step-2 goes when step-3 is written, so any step from 2 on will do
        while not [p for p in root.glob("sft/.ckpt-*/step-*") if 2 <= int(p.name.split("-")[1]) < 12]:
            assert proc.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint from step 2 on"
            time.sleep(0.05)
        victim = _workers(str(root / "sft"))[-1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "TrainJobError" in err and "sft training job (2 processes)" in err, err[-2000:]
    assert not list(root.glob("sft/[!.]*")) and not _workers(str(root / "sft"))  # nothing published, none left
    done = [int(p.name.split("-")[1]) for p in root.glob("sft/.ckpt-*/step-*")]
    (steps,) = root.glob("sft/.ckpt-*/job/steps.jsonl")  # what the stage's progress bar followed: rank 0's steps
    reported = [json.loads(line) for line in steps.read_text().splitlines()]
    assert [r["done"] for r in reported] == list(range(1, len(reported) + 1)) and len(reported) >= max(done)
    assert all(r["sequences"] == 8 for r in reported)  # each row is a whole step of both processes
    resumed = run(load_run_config(config), root=root, progress=False)  # resumes from the last checkpoint
    fresh = run(load_run_config(config), root=tmp_path / "fresh", progress=False)
    history = [json.loads(line) for line in (Path(resumed.refs["sft"].uri) / "history.jsonl").read_text().splitlines()]
    assert done and [h["step"] for h in history] == list(range(1, 13))
    trained = {name: read_output(r.refs["sft"]).metrics["perf/train_tokens"] for name, r in
               (("resumed", resumed), ("fresh", fresh))}
    after = sum(h["tokens"] for h in history if h["step"] > max(done))
    assert trained["resumed"] == after < trained["fresh"]  # the rerun trained only the steps after the checkpoint
    a, b = _weights(fresh.refs["sft"]), _weights(resumed.refs["sft"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-12, atol=0, msg=key)


def test_the_progress_reader_takes_only_complete_new_lines(tmp_path):
    from pipeline.rounds.launch import _new_rows

    path = tmp_path / "steps.jsonl"
    assert _new_rows(path, 0) == ([], 0)  # the job has not reported yet
    path.write_text('{"done": 1}\n{"done": 2}\n{"do')
    rows, offset = _new_rows(path, 0)
    assert [r["done"] for r in rows] == [1, 2]
    path.write_text('{"done": 1}\n{"done": 2}\n{"done": 3}\n')
    rows, offset = _new_rows(path, offset)
    assert [r["done"] for r in rows] == [3] and _new_rows(path, offset) == ([], offset)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_several_nodes_need_a_rendezvous_endpoint():
    from pipeline.config import LaunchConfig
    from pipeline.rounds.launch import _command

    with pytest.raises(ValueError, match="needs launch.rdzv_endpoint"):
        LaunchConfig(nodes=2)
    with pytest.raises(ValueError, match="expected host:port"):
        LaunchConfig(nodes=2, rdzv_endpoint="10.0.0.1")
    launch = LaunchConfig(nodes=2, processes=4, rdzv_endpoint="10.0.0.1:29400", rdzv_id="run7")
    assert launch.launched and launch.world_size == 8
    host, guest = _command(launch, Path("job.json"), "ab12"), _command(launch, Path("job.json"), "ab12", host=False)
    assert host[host.index("--rdzv-id") + 1] == "run7-ab12" and "is_host=1" in host and "is_host=0" in guest
    assert "--standalone" in _command(LaunchConfig(processes=2), Path("job.json"), "ab12")


def test_a_follower_joins_only_the_fresh_unfinished_jobs_of_several_nodes(tmp_path):
    """The store lists every job.json under a run root (`store.jobs.job_files`); `follow` joins only a job of
    several nodes with a launch id, no result yet and written within the rendezvous join timeout."""
    import os
    import time

    from pipeline.config import SFTConfig
    from pipeline.rounds.job import TrainJob
    from pipeline.rounds.launch import JOIN_TIMEOUT_S, _waiting_jobs
    from pipeline.store.jobs import job_files

    def job(name: str, nodes: int, launch_id: str = "ab12") -> Path:
        folder = tmp_path / "sft" / f".ckpt-{name}" / "job"
        folder.mkdir(parents=True)
        launch = {"nodes": nodes, "rdzv_endpoint": "127.0.0.1:29400"} if nodes > 1 else {}
        cfg = SFTConfig(train={"launch": launch}).model_dump(mode="json")
        spec = folder / "job.json"
        spec.write_text(TrainJob(phase="sft", config=cfg, model="m", folder=str(folder), out="o",
                                 launch_id=launch_id).model_dump_json())
        return spec

    waiting = job("waiting", 2, "w1")
    job("one-node", 1, "n1")
    (job("finished", 2, "f1").parent / "result.json").write_text("{}")
    stale = job("stale", 2, "s1")
    os.utime(stale, (time.time() - JOIN_TIMEOUT_S - 5,) * 2)
    (tmp_path / "sft" / "not-a-job.json").write_text("{}")
    assert len(job_files(tmp_path)) == 4
    assert _waiting_jobs(job_files(tmp_path)) == {"w1": waiting}


@pytest.mark.slow
def test_two_nodes_train_the_sft_of_one_process(tmp_path):
    """Two torchrun agents of 1 process each on 127.0.0.1, met by c10d rendezvous: the stage's, and a follower
    started as another node would start it; the SFT weights equal the in-process run's in float64."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.run import run

    only_sft = {"chain": ["sft"]}
    one = run(apply_overrides(_config(1), only_sft), root=tmp_path, progress=False)
    two_nodes = _config(1, nodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_id="test")
    with open(tmp_path / "follower.log", "w") as log:
        follow = ("from pipeline.rounds.launch import follow; from pipeline.store.jobs import job_files; "
                  f"follow(lambda: job_files({str(tmp_path)!r}))")  # what `gft follow RUN_ROOT` runs
        follower = subprocess.Popen([sys.executable, "-c", follow], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        two = run(apply_overrides(two_nodes, only_sft), root=tmp_path, progress=False)
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(60)
    assert "exit code 0" in (tmp_path / "follower.log").read_text()  # the follower's agent trained and ended
    a, b = _weights(one.refs["sft"]), _weights(two.refs["sft"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=key)
    print(f"sft (2 nodes x 1 process): max |2 nodes - 1 process| = {max((b[k] - a[k]).abs().max().item() for k in a):.2e}")


class _Sleepy:
    """A stand-in engine that records sleep, wake-up and weight loads (vLLM's sleep mode needs CUDA)."""

    def __init__(self, name: str, events: list, inner=None):
        self.name, self.events, self.inner, self.asleep, self.closed = name, events, inner, False, False

    def generate(self, prompt_ids, n, sampling):
        assert not self.asleep, f"{self.name} sampled while asleep"
        return self.inner.generate(prompt_ids, n, sampling)

    def load_weights(self, model_dir):
        assert not self.asleep, f"{self.name} loaded weights while asleep"
        self.events.append((self.name, "load", str(model_dir)))
        self.inner.load_weights(model_dir)

    def sleep(self):
        self.asleep = True
        self.events.append((self.name, "sleep"))

    def wake_up(self):
        self.asleep = False
        self.events.append((self.name, "wake"))

    def close(self):
        self.closed = True
        if self.inner is not None:
            self.inner.close()


def test_engines_sleep_around_a_block_and_wake_even_when_it_fails(tmp_path):
    from pipeline.config import EngineConfig
    from pipeline.runtime import Resources, _Loaded
    from pipeline.store.artifacts import StageStore

    events: list = []
    sleepy, awake, hf = (_Sleepy(n, events) for n in ("sleepy", "awake", "hf"))
    res = Resources(StageStore(tmp_path))
    res.engines = {"policy": _Loaded(sleepy, EngineConfig(backend="vllm", enable_sleep_mode=True)),
                   "eval": _Loaded(sleepy, EngineConfig(backend="vllm", enable_sleep_mode=True)),  # one object
                   "teacher": _Loaded(awake, EngineConfig(backend="vllm")),  # no sleep mode: keeps its memory
                   "base": _Loaded(hf, EngineConfig(backend="hf", enable_sleep_mode=True))}
    with res.engines_asleep() as asleep:
        assert asleep == [sleepy] and events == [("sleepy", "sleep")]
    assert events == [("sleepy", "sleep"), ("sleepy", "wake")]
    with pytest.raises(RuntimeError, match="job failed"), res.engines_asleep():
        raise RuntimeError("job failed")
    assert events[2:] == [("sleepy", "sleep"), ("sleepy", "wake")] and not sleepy.asleep


@pytest.mark.slow
def test_a_round_s_engine_sleeps_through_its_launched_job_and_loads_the_new_weights(tmp_path, monkeypatch):
    """The tiny run with launched GFT rounds and a vLLM engine in sleep mode (a recording stand-in around the HF
    engine): every job runs while the policy engine sleeps, it wakes after, and the next round loads the
    previous round's published model/ from its folder."""
    from pipeline import runtime
    from pipeline.rollout.engines import HFEngine
    from pipeline.rounds import launch as launch_lib
    from pipeline.run import run

    events: list = []
    engines: dict = {}

    def build(model_dir, cfg, *, progress=True):
        inner = HFEngine(model_dir, cfg.model_copy(update={"backend": "hf"}), progress=progress)
        return engines.setdefault(str(model_dir), _Sleepy(f"engine{len(engines)}", events, inner))

    real_run_job = launch_lib.run_job

    def run_job(job, launch, **kw):
        events.append(("job", job.phase, all(e.asleep for e in engines.values() if not e.closed)))  # released: gone
        return real_run_job(job, launch, **kw)

    monkeypatch.setattr(runtime, "build_engine", build)
    monkeypatch.setattr(launch_lib, "run_job", run_job)
    cfg = apply_overrides(load_run_config(TINY), {"tracking.enabled": False, "engine.backend": "vllm",
                                                  "engine.enable_sleep_mode": True, "gft.train.launch.job": True})
    result = run(cfg, root=tmp_path, progress=False)
    jobs = [e for e in events if e[0] == "job"]
    assert jobs == [("job", "gft_round", True)] * 2  # both rounds' jobs ran with every open engine asleep
    policy = engines[str(Path(result.refs["sft"].uri) / "model")]  # built for round 0 from SFT's checkpoint
    final = Path(result.refs["gft"].uri)
    (round_0,) = [p for p in final.parent.iterdir() if p.is_dir() and not p.name.startswith(".") and p != final]
    assert [e[1:] for e in events if e[0] == policy.name] == [
        ("sleep",), ("wake",), ("load", str(round_0 / "model")), ("sleep",), ("wake",)]

