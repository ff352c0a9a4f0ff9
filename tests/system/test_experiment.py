"""Experiments (`pipeline.experiment`: schema, runner, report): configs derived from the base by the grid and nothing else, `extends`,
bad grids named, the mean and std over seeds against the trials' own metrics files, a failed trial reported
without stopping the others, and the report's files. The CI-size paper table runs through Prefect in
tests/system/test_flows.py."""

import json
import math
import statistics
from pathlib import Path

import pytest

from pipeline.config import RunConfig, apply_overrides, load_toml
from pipeline.experiment.schema import expand, experiment_root, load_experiment
from pipeline.experiment.trials import local_trial, run_experiment
from tests.figures import assert_draws

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_run.toml"
PAPER = REPO / "experiments" / "paper_table.toml"


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix.rstrip("."): obj}


def _changed(base: RunConfig, cfg: RunConfig) -> dict:
    a, b = _flat(base.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    return {k: b[k] for k in a if a[k] != b[k]}


# ---------------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------------


def test_apply_overrides_changes_exactly_the_named_fields():
    base = load_toml(RunConfig, TINY)
    cfg = apply_overrides(base, {"gft.tau": 0.7, "sft.train.lr": 0.01, "chain": ["gft"]})
    assert _changed(base, cfg) == {"gft.tau": 0.7, "sft.train.lr": 0.01, "chain": ["gft"]}
    assert base.gft.tau == 0.5  # the base is not touched


@pytest.mark.parametrize("overrides, needle", [
    ({"gft.taux": 1}, "unknown field 'gft.taux'"),
    ({"gft.tau.x": 1}, "unknown field 'gft.tau.x'"),
    ({"nope": 1}, "unknown field 'nope'"),
    ({"gft.tau": -1}, "gft.tau"),
    ({"gft.teacher": 5}, "raise teacher_sample.k"),
    # the round loops set these; a value would silently do nothing
    ({"gft.train.sequences_per_step": 64}, "gft.train.sequences_per_step = 64 has no effect"),
    ({"gft.train.num_steps": 3}, "gft.train.num_steps = 3 has no effect"),
    ({"grpo.train.epochs": 2.0}, "grpo.train.epochs = 2.0 has no effect"),
    ({"grpo.train.save_every": 5}, "grpo.train.save_every = 5 has no effect"),
])
def test_apply_overrides_names_the_bad_field(overrides, needle):
    with pytest.raises(ValueError, match="variant v") as err:
        apply_overrides(load_toml(RunConfig, TINY), overrides, where="variant v")
    assert needle in str(err.value)


def test_round_owned_train_field_in_a_toml_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    text = TINY.read_text()
    gft_train = "train = { lr = 1e-3, micro_batch_size = 16 }"
    assert text.index("[gft]") < text.index(gft_train) < text.index("[eval]")
    bad.write_text(text.replace(gft_train, "train = { lr = 1e-3, sequences_per_step = 8, keep_checkpoints = 2 }"))
    with pytest.raises(ValueError, match="bad.toml") as err:
        load_toml(RunConfig, bad)
    assert "gft.train.keep_checkpoints = 2 has no effect" in str(err.value)  # 8 is the default: allowed
    assert load_toml(RunConfig, TINY).gft.train.sequences_per_step == 8


# ---------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------


def test_paper_table_trials_change_only_what_their_variant_names():
    exp = load_experiment(PAPER)
    base = load_toml(RunConfig, exp.base)
    trials = expand(exp)
    assert len(trials) == 1 + 10 * 3 + 5 * 3 + 7 * 3  # base at one seed; 10 variants, 5 + 7 sweep points, 3 seeds
    assert len({t.id for t in trials}) == len(trials)
    for t in trials:
        expected = {k: v for k, v in t.overrides.items() if not k.startswith(("name", "tracking."))}
        changed = _changed(base, t.config)
        assert {k: v for k, v in changed.items() if not k.startswith(("name", "tracking."))} == {
            k: v for k, v in expected.items() if _flat(base.model_dump(mode="json")).get(k) != v}
        assert t.config.seed == t.config.gft.sampling.seed == t.config.sft.train.seed == t.seed
        assert t.config.tracking.experiment == "paper_table"
    by_id = {t.id: t.config for t in trials}
    assert by_id["gft_no_gal.s1"].gft.teacher == 0 and by_id["gft_no_gal.s1"].gft.policy == 0  # variant beats [overrides]
    assert by_id["gft.s2"].gft.rounds * by_id["gft.s2"].gft.prompts_per_round == 108
    assert by_id["tau-1.5.s0"].gft.tau == 1.5 and by_id["tau-0.s0"].gft.tau == 0.0
    c = by_id["composition-8-0.s0"]
    assert (c.gft.expert, c.gft.teacher, c.gft.policy, c.teacher_sample.k) == (1, 7, 0, 7)
    assert by_id["sft_gft_grpo.s1"].chain == ("sft", "gft", "grpo")
    assert by_id["base.s0"].chain == () and "base.s1" not in by_id


def test_paper_table_ci_extends_the_paper_table(tmp_path):
    full, ci = load_experiment(PAPER), load_experiment(REPO / "experiments" / "paper_table_ci.toml")
    assert list(ci.variants) == list(full.variants) and ci.sweeps == full.sweeps
    assert ci.seeds == (0,) and Path(ci.base) == TINY
    assert ci.overrides["gft.teacher"] == 3 and ci.overrides["gft.rounds"] == 1  # merged field by field
    assert len(expand(ci)) == 1 + 10 + 5 + 7


def test_paper_gpu_is_the_papers_setting(monkeypatch):
    # the paper's hub models are not in this machine's HF cache; this test reads the settings, not the models
    monkeypatch.setattr("pipeline.config.run._hub_model_unavailable", lambda repo_id: None)
    exp = load_experiment(REPO / "experiments" / "paper_gpu.toml")
    trials = {t.id: t.config for t in expand(exp)}
    assert set(exp.variants) == set(load_experiment(PAPER).variants) and set(exp.sweeps) == {"composition", "tau"}
    gft = trials["gft.s0"]
    assert gft.models.base == "Qwen/Qwen2.5-Math-1.5B" and gft.engine.backend == "vllm"
    assert (gft.gft.expert, gft.gft.teacher, gft.gft.policy) == (1, 3, 4)
    assert (gft.gft.train.lr, gft.gft.prompts_per_round, gft.gft.minibatches_per_round) == (1e-6, 128, 4)
    assert gft.gft.rounds * gft.gft.prompts_per_round * 10 <= gft.data.max_prompts  # a tenth of SFT's prompts
    assert (gft.eval.k, gft.eval.sampling.temperature) == (16, 0.5)
    assert [trials[f"tau-{v}.s0"].gft.tau for v in ("0", "0.7", "1.5")] == [0.0, 0.7, 1.5]
    grpo = trials["gft_grpo.s0"].grpo  # from the base config: the paper's GRPO after GFT
    assert (grpo.rounds, grpo.prompts_per_round, grpo.num_generations, grpo.train.lr) == (78, 128, 8, 1e-6)
    assert grpo.max_response_tokens == grpo.sampling.max_new_tokens == 2048
    assert (grpo.minibatches_per_round, grpo.num_iterations, grpo.beta) == (1, 1, 0.0)  # one on-policy step a round


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_resolves_paths_against_the_file_that_names_them(tmp_path):
    _write(tmp_path / "a" / "parent.toml", f'name = "p"\nbase = "{TINY}"\n[variants.x]\nchain = ["sft"]\n')
    child = _write(tmp_path / "b" / "child.toml", 'extends = "../a/parent.toml"\nname = "c"\nroot = "store"\n'
                   '[variants.y]\nchain = ["gft"]\n[overrides]\n"gft.tau" = 0.9\n')
    exp = load_experiment(child)
    assert exp.name == "c" and list(exp.variants) == ["x", "y"]
    assert experiment_root(exp) == tmp_path / "b" / "store"
    assert all(t.config.gft.tau == 0.9 for t in expand(exp))


@pytest.mark.parametrize("text, needle", [
    ('name = "e"\nbase = "{tiny}"\n', "at least one variant"),
    ('name = "e"\nbase = "{tiny}"\n[variants."a b"]\n', "names may hold"),
    ('name = "e"\nbase = "{tiny}"\n[sweeps.s]\nfield = "gft.tau"\n', "either `field` with `values`"),
    ('name = "e"\nbase = "{tiny}"\n[sweeps.s]\nfield = "gft.tau"\nvalues = [1]\npoints = {{ a = {{}} }}\n',
     "not both"),
    ('name = "e"\nbase = "{tiny}"\nsed = 1\n[variants.a]\n', "sed"),
])
def test_bad_experiment_files_are_named(tmp_path, text, needle):
    path = _write(tmp_path / "e.toml", text.format(tiny=TINY))
    with pytest.raises(ValueError, match=str(path)) as err:
        load_experiment(path)
    assert needle in str(err.value)


def test_bad_variant_field_names_the_variant_and_seed(tmp_path):
    path = _write(tmp_path / "e.toml", f'name = "e"\nbase = "{TINY}"\n[variants.bad]\noverrides = {{ "gft.tua" = 1 }}\n')
    with pytest.raises(ValueError, match="variant 'bad', seed 0: unknown field 'gft.tua'"):
        expand(load_experiment(path))


def test_extends_loop_and_missing_parent(tmp_path):
    _write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ValueError, match="loops back"):
        load_experiment(tmp_path / "a.toml")
    _write(tmp_path / "c.toml", 'extends = "missing.toml"\n')
    with pytest.raises(FileNotFoundError, match="missing.toml.*extended by"):
        load_experiment(tmp_path / "c.toml")


def test_only_selects_variants_or_sweeps_and_rejects_unknown_names():
    exp = load_experiment(PAPER)
    assert {t.variant for t in expand(exp, only=["gft", "tau"])} == {"gft"} | {
        f"tau-{v}" for v in ("0", "0.1", "0.3", "0.5", "0.7", "0.9", "1.5")}
    with pytest.raises(ValueError, match="'gtf'.*known"):
        expand(exp, only=["gtf"])


# ---------------------------------------------------------------------------------------------------------
# running and summarising (tiny models, in-process)
# ---------------------------------------------------------------------------------------------------------


MINI = """
name = "mini"
base = "{tiny}"
seeds = [0, 1]
[overrides]
"gft.rounds" = 1
"gft.prompts_per_round" = 2
"gft.minibatches_per_round" = 1
[variants.base]
chain = []
seeds = [0]
[variants.sft]
chain = ["sft"]
[variants.broken]
chain = ["gft"]
overrides = {{ "gft.reward" = "no_such_module_xyz:reward", "reward_modules" = ["no_such_module_xyz"] }}
[sweeps.tau]
field = "gft.tau"
values = [0.0, 1.5]
"""


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini-store")
    path = _write(root / "mini.toml", MINI.format(tiny=TINY))
    exp = load_experiment(path)
    return exp, root, run_experiment(exp, root, local_trial(root), progress=False)


def test_failed_trial_is_reported_and_the_others_finish(mini):
    exp, root, result = mini
    assert result.failed == ["broken.s0", "broken.s1"]
    assert [r.trial.id for r in result.trials if r.refs is not None] == [
        "base.s0", "sft.s0", "tau-0.s0", "tau-1.5.s0", "sft.s1", "tau-0.s1", "tau-1.5.s1"]
    md = result.report.read_text()
    assert "## Failed trials" in md and "`broken.s0`" in md and "no_such_module_xyz" in md


def test_mean_and_std_over_seeds_match_the_trials_metrics_files(mini):
    exp, root, result = mini
    table = json.loads((result.report.parent / "results.json").read_text())
    refs = {r.trial.id: r.refs for r in result.trials if r.refs}
    for variant, final in (("sft", "eval/sft"), ("tau-1.5", "eval/gft")):
        values = [json.loads((refs[f"{variant}.s{s}"][final].path / "metrics.json").read_text()) for s in (0, 1)]
        for col in ("greedy_accuracy", "mean@2", "pass@2", "entropy", "kl_base_policy"):
            mean, std = table["variants"][variant][col]
            assert math.isclose(mean, statistics.mean(v[col] for v in values), abs_tol=1e-12)
            assert math.isclose(std, statistics.stdev(v[col] for v in values), abs_tol=1e-12)
        assert table["variants"][variant]["seeds"] == [0, 1]
    assert math.isnan(table["variants"]["base"]["greedy_accuracy"][1])  # one seed: no std


def test_rectified_fraction_follows_tau(mini):
    exp, root, result = mini
    rows = json.loads((result.report.parent / "results.json").read_text())["variants"]
    assert rows["tau-0"]["rectified_frac"][0] == 0.0  # tau = 0: nothing rectified
    assert rows["tau-1.5"]["rectified_frac"][0] == 1.0  # tau > 1: every token (p <= 1 < tau)
    assert "rectified_frac" not in rows["sft"]


def test_prompts_seen_counts_rounds_and_sft_passes(mini):
    exp, root, result = mini
    rows = json.loads((result.report.parent / "results.json").read_text())["variants"]
    train_rows = 30  # tiny_run: 40 rows, 25% held out
    tiny = load_toml(RunConfig, TINY)
    # SFT takes num_steps x sequences_per_step sequences over one expert trace per prompt
    assert rows["sft"]["prompts_seen"] == pytest.approx(tiny.sft.train.num_steps * tiny.sft.train.sequences_per_step)
    assert rows["sft"]["prompts_seen"] <= train_rows
    assert rows["tau-0"]["prompts_seen"] == 2  # 1 round x 2 prompts
    assert [p["stage"] for p in rows["sft"]["checkpoints"]] == ["base", "sft"]


def test_report_files_and_mlflow_parent_run(mini):
    exp, root, result = mini
    out = result.report.parent
    for name in ("results.md", "results.json"):
        assert (out / name).stat().st_size > 500, name
    for name in ("accuracy_vs_prompts.png", "steps.png", "sweep_tau.png"):
        assert_draws(out / name)
    md = result.report.read_text()
    assert "## Variants" in md and "## Sweep `tau`" in md and "| gft.tau = 1.5 | gft |" in md

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    xp = client.get_experiment_by_name("mini")
    parent = client.search_runs([xp.experiment_id], filter_string="tags.`pipeline.stage` = 'experiment'")[0]
    assert parent.info.status == "FAILED"  # two trials failed
    children = client.search_runs([xp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["experiment.variant"] + ".s" + r.data.tags["experiment.seed"] for r in children) == \
        sorted(r.trial.id for r in result.trials)
    assert parent.data.metrics["sft/greedy_accuracy_mean"] == pytest.approx(
        json.loads((out / "results.json").read_text())["variants"]["sft"]["greedy_accuracy"][0])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/results.md", "report/sweep_tau.png"} <= artifacts


def result_refs(result, trial_id: str) -> dict:
    return next(r.refs for r in result.trials if r.trial.id == trial_id)


def test_reuse_from_another_mlflow_experiment_names_its_producer(mini):
    exp, root, result = mini
    from mlflow import MlflowClient

    from pipeline.run import run

    trial = next(t for t in expand(exp) if t.id == "sft.s0")
    cfg = apply_overrides(trial.config, {"tracking.experiment": "elsewhere"})
    run(cfg, root=root, progress=False)  # every stage is served from the store the experiment filled
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    mini_id = client.get_experiment_by_name("mini").experiment_id
    there = client.get_experiment_by_name("elsewhere").experiment_id
    (parent,) = client.search_runs([there], filter_string="tags.`pipeline.stage` = 'pipeline'")
    reused = {k: v for k, v in parent.data.tags.items() if k.startswith("reused.")}
    assert {"reused.sft", "reused.eval/base", "reused.eval/sft"} <= set(reused), sorted(reused)
    sft_eval = json.loads((result_refs(result, "sft.s0")["eval/sft"].path / "metrics.json").read_text())
    assert parent.data.metrics["eval/sft/greedy_accuracy"] == pytest.approx(sft_eval["greedy_accuracy"])
    assert "eval/base/greedy_accuracy" in parent.data.metrics  # each evaluation under its own name
    for name, run_id in reused.items():  # each points at the run in `mini` that made that output
        producer = client.get_run(run_id)
        assert producer.info.experiment_id == mini_id, name
        assert producer.data.tags["pipeline.output_sha256"], name


def test_stage_of_another_experiment_takes_the_producers_logged_model_as_input(mini):
    exp, root, result = mini
    from mlflow import MlflowClient

    from pipeline.run import run

    trial = next(t for t in expand(exp) if t.id == "sft.s0")
    cfg = apply_overrides(trial.config, {"tracking.experiment": "elsewhere-gft", "chain": ["sft", "gft"]})
    refs = run(cfg, root=root, progress=False).refs  # SFT served from `mini`'s store, GFT computed here
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    mini_id = client.get_experiment_by_name("mini").experiment_id
    there = client.get_experiment_by_name("elsewhere-gft").experiment_id
    first_round = client.search_runs([there], filter_string="tags.`pipeline.stage` = 'gft_round'",
                                     order_by=["attributes.start_time ASC"])[0]
    inputs = [client.get_logged_model(m.model_id)
              for m in client.get_run(first_round.info.run_id).inputs.model_inputs]  # search_runs omits them
    sft_model = next(m for m in inputs if m.tags["pipeline.sha256"] == refs["sft"].sha256)
    assert sft_model.experiment_id == mini_id and sft_model.source_run_id  # the model the SFT run logged
    copies = client.search_logged_models([there], filter_string=f"tags.`pipeline.sha256` = '{refs['sft'].sha256}'")
    assert len(copies) == 0  # no second entity for the same checkpoint


def test_rerun_serves_every_finished_stage(mini):
    exp, root, _ = mini
    from pipeline import runtime

    calls: dict[str, int] = {}
    real = runtime.Resources.count

    def counting(self, name, n=1):
        calls[name] = calls.get(name, 0) + n
        return real(self, name, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.Resources, "count", counting)
        again = run_experiment(exp, root, local_trial(root), only=["sft", "tau"], progress=False)
    assert not again.failed and calls == {}


# ---------------------------------------------------------------------------------------------------------
# [tune]: one grid for every method, each row picked on validation (experiments/fair_table.toml)
# ---------------------------------------------------------------------------------------------------------

FAIR = REPO / "experiments" / "fair_table.toml"


def test_tune_runs_every_tuned_variant_at_every_grid_point():
    exp = load_experiment(FAIR)
    trials = expand(exp)
    grid = exp.tune.values
    tuned = [n for n, v in exp.variants.items() if v.chain]
    assert len(trials) == 1 + len(tuned) * len(grid) * len(exp.seeds)  # the base row runs once, untuned
    for t in trials:
        if not t.config.chain:
            assert t.point is None and t.id == "base.s0"
            continue
        stage = t.config.chain[-1]
        assert getattr(t.config, stage).train.lr == t.point and t.point in grid
        assert t.id == f"{t.variant}.lr{t.point:g}.s{t.seed}" and t.config.name == f"fair_table.{t.id}"
        assert t.config.eval.validation and t.config.data.validation_fraction > 0
    steps = {t.variant: t.config for t in trials if t.seed == 0 and t.point == grid[0]}
    assert steps["sft"].sft.train.num_steps == steps["gft"].gft.rounds * steps["gft"].gft.minibatches_per_round


def test_tune_without_validation_prompts_is_refused(tmp_path):
    path = _write(tmp_path / "x.toml", f'name = "x"\nbase = "{TINY}"\n[variants.sft]\nchain = ["sft"]\n'
                                       '[tune]\nvalues = [1e-4, 1e-3]\n')
    with pytest.raises(ValueError, match=r"variant 'sft', seed 0, lr0.0001.*eval.validation is false"):
        expand(load_experiment(path))


@pytest.mark.slow
def test_fair_table_ci_picks_each_row_on_validation(tmp_path):
    """experiments/fair_table_ci.toml in process, graded by a reward that a tiny model earns about half the time
    (accuracy would tie at 0 and hide a wrong pick): every tuned variant ran at both points, its row is the point
    whose validation mean@2 (recomputed here from the trials' metrics.json) is highest, its test cells are that
    point's, and the grid table shows every point."""
    path = _write(tmp_path / "fair.toml", f'extends = "{REPO / "experiments" / "fair_table_ci.toml"}"\n'
                  '[overrides]\n"eval.reward" = "tests.reward_helpers:even_length"\n'
                  '"reward_modules" = ["tests.reward_helpers"]\n')
    exp = load_experiment(path)
    result = run_experiment(exp, tmp_path, local_trial(tmp_path), progress=False)
    assert not result.failed
    rows = json.loads((result.report.parent / "results.json").read_text())["variants"]
    metrics = {r.trial.id: json.loads((r.refs[f"eval/{r.trial.config.chain[-1]}"].path / "metrics.json").read_text())
               for r in result.trials if r.trial.config.chain}
    for name, row in rows.items():
        if name == "base":
            assert "tuned" not in row
            continue
        val = {p: metrics[f"{name}.lr{p:g}.s0"]["val/mean@2"] for p in exp.tune.values}
        best = max(exp.tune.values, key=lambda p: val[p])  # first on a tie, as the report
        assert row["tuned"]["picked"] == best, (name, val)
        assert [g["val/mean@2"][0] for g in row["tuned"]["grid"]] == [val[p] for p in exp.tune.values]
        picked = metrics[f"{name}.lr{best:g}.s0"]
        assert row["mean@2"][0] == picked["mean@2"] and row["val/mean@2"][0] == val[best]
        assert row["steps"] == (2 if row["chain"] == ["sft"] else 1 * 2)  # num_steps; rounds x minibatches
    assert len(set(v for m in metrics.values() for k, v in m.items() if k == "val/mean@2")) > 2  # not all ties
    assert rows["sft_108"]["prompts_seen"] == 3  # 16 sequences over 3 prompts: more passes, not more prompts
    md = result.report.read_text()
    assert "## Tuning grid: validation val/mean@2" in md and md.count("**") >= 2 * (len(rows) - 1)
    assert_draws(result.report.parent / "tuning.png")
    assert "![tuning](tuning.png)" in md


def test_the_experiment_package_imports_one_way():
    """schema <- report <- trials: no module imports one after it (TYPE_CHECKING imports included), and none of the
    three is over 450 lines."""
    import ast

    order = ["schema", "report", "trials"]
    folder = REPO / "pipeline" / "experiment"
    for i, name in enumerate(order):
        text = (folder / f"{name}.py").read_text()
        assert len(text.splitlines()) <= 450, name
        imported = {node.module for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)}
        later = {f"pipeline.experiment.{m}" for m in order[i + 1:]}
        assert not imported & later, f"pipeline.experiment.{name} imports {sorted(imported & later)}"


def test_experiment_root_is_the_runs_root_rule(tmp_path):
    """One rule for a store: --root (relative to the working folder), else the experiment's `root`, else the base
    config's root beside the base config, as `pipeline.run.resolve_root` resolves a run's."""
    from pipeline.config import load_run_config
    from pipeline.run import resolve_root

    path = _write(tmp_path / "e.toml", f'name = "e"\nbase = "{TINY}"\n[variants.v]\nchain = []\n')
    exp = load_experiment(path)
    assert experiment_root(exp) == resolve_root(TINY, load_run_config(TINY)) == TINY.parent / "runs"
    assert experiment_root(exp, "rel") == Path("rel").resolve()
