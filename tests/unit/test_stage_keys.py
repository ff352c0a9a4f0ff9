"""Stage keys are derived from the stage's arguments: every argument of every stage changes the key, an engine
setting changes the GFT round's key, a DataFrame is refused, and every model/tokenizer load honours
trust_remote_code. No stage runs here."""

from __future__ import annotations

import ast
import inspect
import types
import typing
from pathlib import Path

import pandas as pd
import pytest

from pipeline import stages
from pipeline.config import EngineConfig, GFTConfig, Settings
from pipeline.store.artifacts import ArtifactRef

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"


def _ref(tag: str) -> ArtifactRef:
    import hashlib

    return ArtifactRef(kind="model", uri=f"/nowhere/{tag}", sha256=hashlib.sha256(tag.encode()).hexdigest(),
                       schema_version=1)


def _concrete(hint):
    """The non-None type of `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _sample(name: str, hint, default):
    if default is not inspect.Parameter.empty and default is not None:
        return default
    kind = _concrete(hint)
    if kind is ArtifactRef:
        return _ref(name)
    if isinstance(kind, type) and issubclass(kind, Settings):
        return kind()
    return {int: 1, bool: False, float: 0.5, str: "x"}[kind]


def _changed(value):
    """Another value of the same type, differing in one field."""
    if isinstance(value, ArtifactRef):
        return value.model_copy(update={"sha256": "f" * 64})
    if isinstance(value, Settings):
        field = next(f for f, v in value.model_dump().items() if type(v) in (int, float))
        return value.model_copy(update={field: getattr(value, field) + 1})
    return (not value) if isinstance(value, bool) else value + type(value)(1) if not isinstance(value, str) else value + "y"


def _arguments(name: str) -> dict:
    fn = stages.STAGES[name].fn
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: _sample(p.name, hints[p.name], p.default) for p in params}


CASES = [(stage, arg) for stage in stages.STAGES for arg in _arguments(stage)]


@pytest.mark.parametrize("stage,argument", CASES, ids=[f"{s}.{a}" for s, a in CASES])
def test_every_argument_of_every_stage_is_in_its_key(stage, argument):
    args = _arguments(stage)
    key = stages.bind(stage, **args).key
    assert stages.bind(stage, **{**args, argument: _changed(args[argument])}).key != key
    if inspect.signature(stages.STAGES[stage].fn).parameters[argument].default is None:
        assert stages.bind(stage, **{**args, argument: None}).key != key  # absent is another key


def test_an_engine_setting_changes_the_gft_round_key():
    args = dict(cfg=GFTConfig(), round_idx=0, prompts=_ref("p"), teacher=None, prev=_ref("m"))
    plain = stages.bind("gft_round", **args, engine=EngineConfig())
    assert stages.bind("gft_round", **args, engine=EngineConfig(dtype="bfloat16")).key != plain.key
    assert stages.bind("gft_round", **args, engine=EngineConfig(trust_remote_code=True)).key != plain.key
    assert plain.spec.inputs == {"prompts": args["prompts"], "prev": args["prev"]}  # roles, absent teacher left out
    assert plain.spec.scalars == {"round_idx": 0, "seed": 0, "threads": 1}


def test_a_stage_argument_that_is_not_settings_reference_or_scalar_is_refused():
    with pytest.raises(TypeError, match="argument 'teacher' is a DataFrame"):
        stages.bind("gft_round", GFTConfig(), 0, _ref("p"), pd.DataFrame(), _ref("m"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        stages.bind("gft_round", GFTConfig(), 0, _ref("p"), None, _ref("m"), res=None)


def test_prepare_data_refuses_a_source_that_is_not_the_datas_content(tmp_path):
    from pipeline.config import DataConfig

    data = tmp_path / "rows.jsonl"
    data.write_text('{"id": "a", "prompt": "p", "solution": "s", "answer": "1"}\n')
    synth, source = stages.prepare_data_inputs(DataConfig(source=str(data)), None)
    assert synth is None and source is not None and source.sha256 != "0" * 64
    job = stages.Job(out=tmp_path, key="k", res=None)
    with pytest.raises(ValueError, match="content reference"):
        stages.STAGES["prepare_data"].fn(job, DataConfig(source=str(data)), None, None)


# ---------------------------------------------------------------------------------------------------------
# trust_remote_code reaches every load
# ---------------------------------------------------------------------------------------------------------

LOADERS = {"from_pretrained", "load_model", "load_tokenizer", "LLM"}
# Loads that cannot run remote code: the generic fast tokenizer class, and the bootstrap's own tiny models.
EXEMPT = {("data/chat.py", "PreTrainedTokenizerFast.from_pretrained")}


def _loads_without_flag(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = f"{func.value.id}.{name}" if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else name
        rel = path.relative_to(PACKAGE).as_posix()
        if name in LOADERS and (rel, owner) not in EXEMPT and "self" not in owner:
            if not any(k.arg in ("trust_remote_code", None) for k in node.keywords):
                out.append(f"{rel}:{node.lineno}: {owner}(...) without trust_remote_code")
    return out


def test_every_model_and_tokenizer_load_passes_trust_remote_code():
    found = [v for p in sorted(PACKAGE.rglob("*.py")) if "rounds/bootstrap.py" not in p.as_posix()
             for v in _loads_without_flag(p)]
    assert found == []


def test_the_trust_remote_code_check_can_fail(tmp_path):
    bad = PACKAGE / "stages.py"
    text = bad.read_text().replace("trust_remote_code=engine.trust_remote_code)", ")", 1)
    probe = tmp_path / "stages.py"
    probe.write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "relative_to", lambda self, other: Path("stages.py"))
        assert any("without trust_remote_code" in v for v in _loads_without_flag(probe))


# ---------------------------------------------------------------------------------------------------------
# The run passes an input only when it changes what the stage writes
# ---------------------------------------------------------------------------------------------------------


def _calls(tmp_path, **overrides) -> list[stages.StageCall]:
    """The stage calls of the tiny run's DAG, each answered with a placeholder output (nothing runs)."""
    from pipeline import run, runtime
    from pipeline.config import apply_overrides, load_run_config
    from pipeline.store.artifacts import StageStore

    cfg = apply_overrides(load_run_config(Path(__file__).parents[1] / "data" / "tiny_run.toml"), overrides)
    calls: list[stages.StageCall] = []

    def record(call: stages.StageCall) -> ArtifactRef:
        calls.append(call)
        return _ref(f"{call.stage}-{len(calls)}").model_copy(update={"kind": "pending"})

    run.execute(cfg, record, runtime.Resources(StageStore(tmp_path), progress=False))
    return calls


def test_the_grpo_reference_is_an_argument_only_when_beta_weighs_the_kl(tmp_path):
    no_kl = [c for c in _calls(tmp_path, chain=["grpo"], **{"grpo.beta": 0.0}) if c.stage == "grpo_round"]
    assert no_kl and all(c.arguments["reference"] is None and "reference" not in c.spec.inputs for c in no_kl)
    with_kl = [c for c in _calls(tmp_path, chain=["grpo"], **{"grpo.beta": 0.1}) if c.stage == "grpo_round"]
    start = with_kl[0].arguments["prev"]
    assert all(c.spec.inputs["reference"] == start for c in with_kl)  # every round: the checkpoint GRPO began at


def test_sft_takes_the_teacher_responses_only_when_it_trains_on_them(tmp_path):
    (expert,) = [c for c in _calls(tmp_path, chain=["sft"]) if c.stage == "sft"]
    (mix,) = [c for c in _calls(tmp_path, chain=["sft"], **{"sft.source": "mix"}) if c.stage == "sft"]
    assert "teacher" not in expert.spec.inputs and "teacher" in mix.spec.inputs


# ---------------------------------------------------------------------------------------------------------
# Run-only settings stay out of the key; roles enter it (issue 26 item 3)
# ---------------------------------------------------------------------------------------------------------


def _gft_args(**over) -> dict:
    args = dict(cfg=GFTConfig(), round_idx=0, prompts=_ref("p"), teacher=None, prev=_ref("m"), engine=EngineConfig())
    return {**args, **over}


def _with(settings: Settings, path: str, value) -> Settings:
    """A copy of `settings` with the dotted field `path` set to `value`, validated again."""
    from pipeline.config import apply_overrides

    return apply_overrides(settings, {path: value})


@pytest.mark.parametrize("path,value", [("train.launch.timeout_s", 60.0), ("train.launch.rdzv_id", "elsewhere"),
                                        ("train.launch.rdzv_endpoint", "10.0.0.2:29500")])
def test_how_long_and_where_a_round_job_runs_keeps_the_gft_round_key(path, value):
    plain = stages.bind("gft_round", **_gft_args()).key
    assert stages.bind("gft_round", **_gft_args(cfg=_with(GFTConfig(), path, value))).key == plain


@pytest.mark.parametrize("field,value", [("enable_sleep_mode", True), ("gpu_memory_utilization", 0.9),
                                         ("kv_cache_gib", 4.0)])
def test_an_engines_memory_settings_keep_the_round_and_evaluate_keys(field, value):
    from pipeline.config import EvalConfig

    engine = EngineConfig(**{field: value})
    assert stages.bind("gft_round", **_gft_args(engine=engine)).key == stages.bind("gft_round", **_gft_args()).key
    args = dict(cfg=EvalConfig(), prompts=_ref("p"), model=_ref("m"), base=_ref("b"))
    assert stages.bind("evaluate", **args, engine=engine).key == stages.bind("evaluate", **args).key


@pytest.mark.parametrize("path,value", [("train.lr", 2e-4), ("train.launch.processes", 2),
                                        ("train.launch.strategy", "fsdp"), ("train.master_dtype", "float64"),
                                        ("train.micro_batch_size", 8)])
def test_what_changes_the_weights_changes_the_gft_round_key(path, value):
    plain = stages.bind("gft_round", **_gft_args()).key
    assert stages.bind("gft_round", **_gft_args(cfg=_with(GFTConfig(), path, value))).key != plain


def test_input_roles_are_in_the_key():
    args = dict(cfg=GFTConfig(), round_idx=0, prompts=_ref("p"), teacher=_ref("t"), prev=_ref("m"))
    swapped = {**args, "teacher": args["prev"], "prev": args["teacher"]}
    assert stages.bind("gft_round", **swapped).key != stages.bind("gft_round", **args).key
    from pipeline.config import EvalConfig

    model, base = _ref("policy"), _ref("base")
    evaluate = dict(cfg=EvalConfig(), prompts=_ref("p"))
    assert stages.bind("evaluate", **evaluate, model=model, base=base).key != \
        stages.bind("evaluate", **evaluate, model=base, base=model).key


def test_a_digest_moved_to_another_role_gives_another_key():
    from pipeline.config import SFTConfig
    from pipeline.store.cache import derive_spec

    cfg, prompts, digest = SFTConfig(), _ref("p"), _ref("x")
    as_teacher = derive_spec("sft", "model", {"cfg": cfg, "prompts": prompts, "teacher": digest})
    as_init = derive_spec("sft", "model", {"cfg": cfg, "prompts": prompts, "init": digest})
    assert as_teacher.key != as_init.key


def test_settings_enter_the_key_under_their_role():
    from pipeline.store.cache import derive_spec

    a, b = EngineConfig(), EngineConfig(dtype="bfloat16")
    assert derive_spec("evaluate", "eval", {"engine": a, "base_engine": b}).key != \
        derive_spec("evaluate", "eval", {"engine": b, "base_engine": a}).key
