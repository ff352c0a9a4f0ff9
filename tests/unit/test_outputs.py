"""pipeline/store/outputs.py: the one reader of a stage output (inputs by role, datasets, metrics, history, rounds),
for manifests with roles and for old ones that listed their inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.store.artifacts import ArtifactError, ArtifactRef, Manifest, StageStore, manifest_digest, tree_sha256
from pipeline.store.outputs import find_output, read_chain, read_output


def _write(store: StageStore, stage: str, key: str, files: dict[str, str], *, kind: str = "model",
           inputs=(), datasets=None, metrics=None) -> ArtifactRef:
    with store.write(stage, key, kind=kind, version=1, config={}, inputs=inputs, datasets=datasets) as out:
        for name, text in files.items():
            (out.path / name).parent.mkdir(parents=True, exist_ok=True)
            (out.path / name).write_text(text)
        out.metrics.update(metrics or {})
    return out.ref


def _history(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def _unroled(ref: ArtifactRef) -> None:
    """Rewrite a manifest the way manifests were written before inputs had roles and datasets were declared."""
    path = ref.path / "manifest.json"
    data = json.loads(path.read_text())
    root = ref.path.parent.parent
    data["inputs"] = [{**r, "uri": str(root / r["uri"])} for r in data["inputs"].values()]  # absolute uris then
    del data["datasets"], data["digest"]  # datasets did not exist then
    data["digest"] = manifest_digest(Manifest.model_validate(data))
    path.write_text(json.dumps(data))


@pytest.fixture
def run(tmp_path):
    """prompts -> base (a member of a bootstrap-like pair) -> gft rounds 0, 1, 2 -> evaluate(round 2, base)."""
    store = StageStore(tmp_path / "runs")
    prompts = _write(store, "prepare_data", "p", {"train.parquet": "t", "eval.parquet": "e", "report.json": "{}"},
                     kind="prompts", datasets={"train.parquet": "training", "eval.parquet": "evaluation"})
    pair = _write(store, "bootstrap_models", "b", {"base/model/w": "w"}, kind="models")
    base = ArtifactRef(kind="model", uri=str(pair.path / "base"), sha256=tree_sha256(pair.path / "base"),
                       schema_version=1)
    prev, rounds = base, []
    for r in range(3):
        prev = _write(store, "gft_round", f"r{r}", {"groups.parquet": str(r), "history.jsonl": _history(2 * r + 1,
                      2 * r + 2), "model/w": str(r)}, inputs={"prompts": prompts, "prev": prev},
                      datasets={"groups.parquet": "training"}, metrics={"reward": r / 10})
        rounds.append(prev)
    ev = _write(store, "evaluate", "e", {"metrics.json": '{"mean@4": 0.5}', "samples.parquet": "s"}, kind="eval",
                inputs={"prompts": prompts, "model": prev, "base": base}, datasets={"samples.parquet": "evaluation"},
                metrics={"mean@4": 0.5, "wall_time_s": 2.0})
    return {"store": store, "prompts": prompts, "base": base, "rounds": rounds, "eval": ev}


def test_inputs_datasets_and_metrics_of_one_output(run):
    ev = read_output(run["eval"])
    assert ev.stage == "evaluate" and ev.path == run["eval"].path
    assert ev.inputs == {"prompts": run["prompts"], "model": run["rounds"][-1], "base": run["base"]}
    assert ev.datasets == {"samples.parquet": "evaluation"}
    assert ev.eval_metrics() == {"mean@4": 0.5}
    assert ev.metrics == {"mean@4": 0.5, "wall_time_s": 2.0}
    assert ev.history() == []
    assert ev.file_digest("samples.parquet") == ev.manifest.files["samples.parquet"]
    with pytest.raises(ArtifactError, match="no file 'history.jsonl'"):
        ev.file("history.jsonl")


def test_the_rounds_of_a_chain_stage_walk_prev_back(run):
    chain = read_chain(run["rounds"][-1], "gft_round")
    assert [o.ref for o in chain.outputs] == run["rounds"]
    assert [row["step"] for row in chain.history] == [1, 2, 3, 4, 5, 6]
    assert chain.round_metrics == [{"reward": 0.0}, {"reward": 0.1}, {"reward": 0.2}]
    assert read_chain(run["rounds"][0], "gft_round").round_metrics == [{"reward": 0.0}]
    assert read_chain(run["base"], "gft_round").outputs == ()  # a chain stage of zero rounds


def test_old_manifests_read_by_positional_roles_and_the_kind_table(run):
    """A run root from before inputs had roles: gft_round listed (prompts, prev), evaluate (prompts, model, base),
    and no manifest declared datasets."""
    for ref in [*run["rounds"], run["eval"], run["prompts"]]:
        _unroled(ref)
    ev = read_output(run["eval"])
    assert ev.manifest.inputs == {"input0": run["prompts"], "input1": run["rounds"][-1], "input2": run["base"]}
    assert ev.inputs == {"prompts": run["prompts"], "model": run["rounds"][-1], "base": run["base"]}
    assert ev.datasets == {"samples.parquet": "evaluation"}
    assert read_output(run["prompts"]).datasets == {"train.parquet": "training", "eval.parquet": "evaluation"}
    assert read_output(run["rounds"][0]).datasets == {"groups.parquet": "training"}
    assert [o.ref for o in read_chain(run["rounds"][-1], "gft_round").outputs] == run["rounds"]


def test_a_reference_to_other_content_or_no_stage_output(run):
    assert find_output(run["base"]) is None  # a member folder of the pair: no manifest of its own
    assert find_output(ArtifactRef(kind="external_model", uri="org/model", sha256="0" * 64, schema_version=1)) is None
    assert find_output(run["eval"]).ref == run["eval"]
    other = run["eval"].model_copy(update={"sha256": "f" * 64})
    with pytest.raises(ArtifactError, match="describes content"):
        read_output(other)
    with pytest.raises(ArtifactError, match="no manifest"):
        read_output(run["base"])


def test_a_legacy_sequence_of_inputs_is_written_as_input_i(tmp_path):
    store = StageStore(tmp_path)
    prompts = _write(store, "prepare_data", "p", {"train.parquet": "t"}, kind="prompts")
    ref = _write(store, "sft", "s", {"history.jsonl": _history(1)}, inputs=[prompts, prompts])
    out = read_output(ref)
    assert list(out.manifest.inputs) == ["input0", "input1"]
    assert out.inputs == {"prompts": prompts, "init": prompts}
    assert Path(out.file("history.jsonl")).is_file() and out.history() == [{"step": 1, "loss": 1.0}]


def test_the_run_reads_a_chain_stage_from_its_rounds(run):
    """pipeline.run's chain names (sft, gft, grpo) map to the store's stages (sft, gft_round, grpo_round)."""
    from pipeline.report import chain_outputs, round_metrics, stage_history

    refs = {"gft": run["rounds"][-1], "grpo": run["rounds"][-1], "sft": run["base"]}
    assert [o.ref for o in chain_outputs(refs, "gft").outputs] == run["rounds"]
    assert [r["step"] for r in stage_history(refs, "gft")] == [1, 2, 3, 4, 5, 6]
    assert round_metrics(refs, "gft")[-1] == {"reward": 0.2}
    assert stage_history(refs, "grpo") == [] and round_metrics(refs, "sft") == []  # not outputs of those stages
