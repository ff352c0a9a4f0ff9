"""pipeline/memory (shapes, items, plan): parameter counts from config shapes equal the built models', the items
follow from the settings by their arithmetic (a float check on SmolLM2-135M's shape), what a stage holds follows
the engine lifetime, and a plan over a budget is refused naming the stage, the device and the largest item.

No figure here is a measurement: these check the plan's arithmetic and rules (docs/memory.md compares it with
measured peaks)."""

from __future__ import annotations

import pytest

from pipeline.config import EngineConfig, EvalConfig, GFTConfig, SFTConfig, TeacherSampleConfig, TrainConfig
from pipeline.memory.items import BASELINE_CPU_GB, TRACKING_CPU_GB, Phase, Where, engine_items, trainer_items
from pipeline.memory.plan import MemoryBudgetError, PlanCall, Shapes, check_budget, plan_memory
from pipeline.memory.shapes import ModelShape, shape_from_config

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
           "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False, "dtype": "float32"}


class _Ref:
    """A stand-in for an ArtifactRef: evaluate compares uri and sha256 to tell the base from a trained checkpoint."""

    def __init__(self, name: str):
        self.uri, self.sha256 = name, name


def _count(config_cls, **kw) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config_cls(**kw))
    return sum(p.numel() for p in model.parameters())  # tied weights counted once by parameters()


@pytest.mark.parametrize("family", ["llama_tied", "llama_untied_gqa", "qwen2_bias"])
def test_parameters_from_the_shapes_equal_the_built_models(family):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2 if family != "llama_tied" else 6, tie_word_embeddings=family != "llama_untied_gqa")
    cls = Qwen2Config if family == "qwen2_bias" else LlamaConfig
    config = cls(**kw).to_dict()
    assert shape_from_config(config).params == _count(cls, **kw)


def test_the_bootstrap_models_shape_is_the_built_models():
    from pipeline.data import synthetic

    model = synthetic.build_model(synthetic.build_tokenizer(), size="base", seed=0)
    shape = shape_from_config(model.config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.qkv_bias and shape.tied


def test_smollm2_items_follow_from_the_shape_and_settings():
    """The arithmetic, written out once by hand on SmolLM2-135M's shape: 134,515,008 parameters (embeddings
    49152 x 576 tied; per layer q/o 576x576, k/v 576x192, MLP 3 x 576x1536, two norms; the final norm)."""
    shape = shape_from_config(SMOLLM2)
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert shape.params == 49152 * 576 + 30 * per_layer + 576 == 134_515_008
    train = TrainConfig(micro_batch_size=4, logprob_chunk_size=1024)
    items = {i.name: i.gb for i in trainer_items(Phase("t"), shape, train, Where(False, None), rows=4, tokens=200,
                                                 scored=256).items["cpu"]}
    p = 134_515_008
    assert items["trainer weights"] == pytest.approx(p * 4 / 1e9, rel=1e-12)
    assert items["gradients"] == pytest.approx(p * 4 / 1e9, rel=1e-12)
    assert items["AdamW moments"] == pytest.approx(2 * p * 4 / 1e9, rel=1e-12)
    per_token_layer = 7 * 576 + 2 * 3 * 64 + 3 * 1536  # saved floats per token and layer
    assert items["activations (4 x 200 tokens)"] == pytest.approx(4 * 200 * 30 * per_token_layer * 4 / 1e9, rel=1e-12)
    assert items["logits chunks (256 x 49152)"] == pytest.approx(256 * 49152 * 4 / 1e9, rel=1e-12)
    assert "optimizer step and save transients" not in items  # after backward: the larger of the two counts
    small = {i.name: i.gb for i in trainer_items(Phase("t"), shape, train, Where(False, None), rows=1, tokens=8,
                                                 scored=4).items["cpu"]}
    assert small["optimizer step and save transients"] == pytest.approx(0.75 * p * 4 / 1e9, rel=1e-12)
    assert not any(name.startswith(("activations", "logits")) for name in small)
    checkpointed = {i.name: i.gb for i in trainer_items(
        Phase("t"), shape, train.model_copy(update={"gradient_checkpointing": True}), Where(False, None), rows=16,
        tokens=400, scored=256).items["cpu"]}
    assert checkpointed["activations (16 x 400 tokens)"] == pytest.approx(
        16 * 400 * (per_token_layer + 30 * 576) * 4 / 1e9, rel=1e-12)  # one layer's, plus each layer's input


def test_an_engine_holds_its_weights_and_its_kv_cache_in_its_dtype():
    shape = shape_from_config(SMOLLM2)
    engine = EngineConfig(batch_size=8, max_model_len=1024)
    cpu = {i.name: i.gb for i in engine_items(Phase("s"), "eval", shape, engine, Where(False, 150), n=2,
                                              max_new_tokens=64).items["cpu"]}
    assert cpu["eval engine weights"] == pytest.approx(134_515_008 * 4 / 1e9)
    kv_per_token = 2 * 30 * 3 * 64 * 4
    assert cpu["eval KV cache (16 rows x 214 tokens)"] == pytest.approx(16 * 214 * kv_per_token / 1e9)
    gpu = engine_items(Phase("s"), "eval", shape, engine, Where(True, 150), n=2, max_new_tokens=64).items
    assert not gpu["cpu"] and gpu["cuda"][0].gb == pytest.approx(134_515_008 * 2 / 1e9)  # bf16 on the GPU
    unknown = {i.name for i in engine_items(Phase("s"), "eval", shape, engine, Where(False, None), n=2,
                                            max_new_tokens=64).items["cpu"]}
    assert "eval KV cache (16 rows x 1024 tokens)" in unknown  # prompts unknown: max_model_len bounds them


def _calls(sft_micro: int = 4) -> list[PlanCall]:
    base, engine = _Ref("base"), EngineConfig(batch_size=8, max_model_len=512)
    ev = EvalConfig(k=2, max_prompts=8, kl_samples=1)
    return [PlanCall("prepare_data", "prepare_data", {}),
            PlanCall("teacher_sample", "teacher_sample", {"cfg": TeacherSampleConfig(k=1), "engine": engine}),
            PlanCall("eval/base", "evaluate", {"cfg": ev, "model": base, "base": base, "engine": engine}),
            PlanCall("sft", "sft", {"cfg": SFTConfig(train=TrainConfig(micro_batch_size=sft_micro,
                                                                        sequences_per_step=8))}),
            PlanCall("eval/sft", "evaluate", {"cfg": ev, "model": _Ref("sft"), "base": base, "engine": engine}),
            PlanCall("gft/0", "gft_round", {"cfg": GFTConfig(prompts_per_round=4, teacher=1, minibatches_per_round=1,
                                                             train=TrainConfig(micro_batch_size=8)),
                                            "engine": engine})]


def _names(plan, index: int) -> set[str]:
    return {i.name for i in plan.of(index)["cpu"].items}


def test_what_a_stage_holds_follows_the_engine_lifetime():
    """Now: the teacher's engine goes after its stage, none is held while SFT trains, evaluate after a checkpoint
    holds the base's engine for KL. Before (keep_engines): every engine stays to the end."""
    shapes = Shapes(base=shape_from_config(SMOLLM2))
    now, before = plan_memory(_calls(), shapes, prompt_tokens=150), plan_memory(_calls(), shapes, prompt_tokens=150,
                                                                                 keep_engines=True)
    assert not any("engine" in name for name in _names(now, 3))  # sft
    assert {"teacher engine weights", "eval engine weights"} <= _names(before, 3)
    assert "base engine weights" in _names(now, 4) and "base engine weights" not in _names(now, 2)
    assert not any("engine" in name for name in _names(now, 5) if "policy" not in name)
    assert now.of(3)["cpu"].phase == "training" and now.of(5)["cpu"].phase == "training"
    assert before.of(4)["cpu"].total >= before.of(3)["cpu"].total  # the old process never gives memory back
    assert now.of(0)["cpu"].total == pytest.approx(BASELINE_CPU_GB + TRACKING_CPU_GB)


def test_the_plan_follows_the_batch_settings():
    shapes = Shapes(base=shape_from_config(SMOLLM2))
    small, large = (plan_memory(_calls(m), shapes, prompt_tokens=150).of(3)["cpu"] for m in (2, 4))
    act = {i.name.split(" (")[0]: i.gb for i in small.items}, {i.name.split(" (")[0]: i.gb for i in large.items}
    assert act[1]["activations"] == pytest.approx(2 * act[0]["activations"])
    assert act[1]["trainer weights"] == act[0]["trainer weights"]


def test_a_plan_over_the_budget_is_refused_naming_the_stage_the_device_and_the_largest_item():
    plan = plan_memory(_calls(), Shapes(base=shape_from_config(SMOLLM2)), prompt_tokens=150)
    peaks = {p.label: p.total for p in plan.stages}
    below_sft = peaks["sft"] - 0.01
    others = [t for label, t in peaks.items() if label not in ("sft", "gft/0")]
    assert max(others) < below_sft  # the test's premise: SFT is the first stage over this budget
    with pytest.raises(MemoryBudgetError) as err:
        check_budget(plan, cpu_gb=below_sft)
    message = str(err.value)
    assert "stage sft (sft, training)" in message and "on cpu" in message and "memory.cpu_gb" in message
    assert plan.of(3)["cpu"].largest.name in message
    if plan.of(3)["cpu"].largest.name.startswith("activations"):  # and what bounds it
        assert "train.gradient_checkpointing = true" in message
    check_budget(plan, cpu_gb=max(peaks.values()) + 0.01)  # fits: nothing raised
    check_budget(plan, gpu_gb=0.001)  # no GPU part in a CPU plan


def test_a_launched_job_adds_its_processes():
    shapes = Shapes(base=shape_from_config(SMOLLM2))
    calls = _calls()
    launched = TrainConfig(micro_batch_size=4, sequences_per_step=8, launch={"processes": 2})
    calls[3] = PlanCall("sft", "sft", {"cfg": SFTConfig(train=launched)})
    names = _names(plan_memory(calls, shapes, prompt_tokens=150), 3)
    assert "job: trainer weights x 2 processes" in names and "job: 2 process baselines" in names
