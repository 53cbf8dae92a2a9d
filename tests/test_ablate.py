"""`grpo-jax ablate`: the grid, its report by hand, and the three research experiments' quick grids end to end."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from grpo_jax import cli
from grpo_jax.ablate import AblationConfig, PlotSpec, grid, load_ablation, markdown, reduce_metric, summarize, warm_key
from grpo_jax.config import ConfigError
from grpo_jax.tracking import TIMING_KEYS

from loop_helpers import metrics, tiny_experiment, write_experiment

ROOT = Path(__file__).parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_reduce_by_hand():
    rows = [{"step": 0, "eval/accuracy": 0.1}] + [{"step": s, "a": float(s)} for s in range(1, 7)]
    rows[-1]["eval/accuracy"] = 0.7
    assert reduce_metric(rows, "final", "eval/accuracy", 2) == 0.7
    assert reduce_metric(rows, "initial", "eval/accuracy", 2) == 0.1 and reduce_metric(rows, "initial", "a", 2) == 1
    assert reduce_metric(rows, "first", "a", 2) == 1.5 and reduce_metric(rows, "last", "a", 2) == 5.5
    assert reduce_metric(rows, "mean", "a", 2) == 3.5 and np.isnan(reduce_metric(rows, "last", "missing", 2))
    rows[1]["a"] = 60.0  # a first step that compiles: the median and min ignore it
    assert reduce_metric(rows, "median", "a", 2) == 4.5 and reduce_metric(rows, "min", "a", 2) == 2.0
    assert reduce_metric(rows, "sum", "a", 2) == 60 + 2 + 3 + 4 + 5 + 6
    # convergence speed: a = 1, 5, 2, 6, 7 at steps 1-5 (1 s each); trailing means of 2: 1, 3, 3.5, 4, 6.5
    rows = [{"step": i + 1, "a": a, "time/step_s": 1.0} for i, a in enumerate([1.0, 5.0, 2.0, 6.0, 7.0])]
    assert reduce_metric(rows, "steps_to_4", "a", 2) == 4 and reduce_metric(rows, "time_to_4", "a", 2) == 4.0
    assert reduce_metric(rows, "steps_to_5", "a", 1) == 2 and np.isnan(reduce_metric(rows, "steps_to_7", "a", 2))


def test_summary_table_and_ratios_by_hand(tmp_path):
    def run(name, seed, acc, mem):
        d = tmp_path / name / f"seed{seed}"
        d.mkdir(parents=True)
        lines = [{"step": 1, "memory/peak_bytes": mem, "accuracy": acc / 2}, {"step": 2, "accuracy": acc}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (d / "summary.json").write_text(json.dumps({"wall_s": 10.0 * (seed + 1)}))
        return d

    dirs = {"ppo": {0: run("ppo", 0, 0.4, 100.0), 1: run("ppo", 1, 0.6, 100.0)},
            "grpo": {0: run("grpo", 0, 0.8, 75.0), 1: run("grpo", 1, 1.0, 75.0)}}
    ab = AblationConfig(variants={"ppo": (), "grpo": ()}, table=("last:accur*", "final:memory/peak_bytes"), window=1,
                        anchor="ppo")
    table = summarize(ab, dirs)
    assert table["grpo"] == {"last:accuracy": [0.8, 1.0], "final:memory/peak_bytes": [75.0, 75.0],
                             "wall_s": [10.0, 20.0]}
    text = markdown(ab, table, (0, 1))
    # two seeds: resampled means are the two values (1/4 each) or their mean (1/2): the interval spans the seeds
    assert "| grpo | 0.9 [0.8, 1] (0.8, 1) | 75 [75, 75] (75, 75) | 15 [10, 20] (10, 20) |" in text
    assert "| grpo | 1.8 | 0.75 | 1 |" in text  # ratios to ppo: accuracy .9/.5, memory 75/100, wall time 15/15
    assert "| grpo | 0.4 [0.4, 0.4] * | -25 [-25, -25] * | 0 [0, 0] |" in text  # paired: seed 0 - seed 0, ...


def test_ablation_config_errors(tmp_path):
    with pytest.raises(ValueError, match="reduce:metric"):
        AblationConfig(variants={"a": ()}, table=("mode:x",))
    with pytest.raises(ValueError, match="anchor='b' is not a variant"):
        AblationConfig(variants={"a": ()}, anchor="b")
    with pytest.raises(ValueError, match="steps_to_<level>"):
        AblationConfig(variants={"a": ()}, table=("steps_to_x:accuracy",))
    assert AblationConfig(variants={"a": ()}, table=("steps_to_0.6:accuracy", "time_to_0.6:accuracy")).table
    with pytest.raises(ValueError, match="letters, digits"):
        AblationConfig(variants={"a/b": ()})
    with pytest.raises(ValueError, match="ending in .png"):
        PlotSpec(file="x.jpg", metrics=("a",))
    folder = write_experiment(tmp_path / "exp", tiny_experiment())
    with pytest.raises(ConfigError, match="ablation.yaml: no such file"):
        load_ablation(folder)
    (folder / "ablation.yaml").write_text("variants: {good: [], bad: [train.stepz=3]}\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="variant 'bad'.*stepz"):
        grid(folder, load_ablation(folder), quick=False)
    assert cli.main(["ablate", str(folder)]) == 2  # one config-error line, before any compute
    (folder / "second.yaml").write_text("variants: {one: [train.steps=3]}\nseeds: [4]\n"
                                        "common: [train.steps=9, train.batch_prompts=2]\n")
    (name, seed, cfg), = grid(folder, load_ablation(folder, "second.yaml"), quick=False)  # a name in the folder
    assert (name, seed, cfg.train.steps, cfg.seed) == ("one", 4, 3, 4)  # the variant overrides `common`
    assert cfg.train.batch_prompts == 2
    assert load_ablation(folder, folder / "second.yaml") == load_ablation(folder, "second.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load_ablation(folder, "nope.yaml")


def test_arith_tiny_async_grid_builds():
    """Issue 16's grid over the default experiment: every run's config builds, and the variants differ only in the
    rollout mode, staleness and correction."""
    folder = ROOT / "experiments" / "arith_tiny"
    runs = grid(folder, load_ablation(folder, "async.yaml"), quick=False)
    got = {(n, s): (c.rollout.mode, c.rollout.max_staleness, c.algo.loss.off_policy and c.algo.loss.off_policy.weight)
           for n, s, c in runs}
    assert got[("sync", 2)] == ("sync", 1, None) and got[("one_step_off_tis", 0)] == ("one_step_off", 1, "truncate")
    assert got[("async2", 1)] == ("async", 2, None) and got[("async2_tis", 2)] == ("async", 2, "truncate")
    assert len({warm_key(c) for _, _, c in runs}) == 3  # one warm start per seed, shared by the variants


def _quick(name: str, tmp_path: Path) -> tuple[Path, AblationConfig]:
    folder = ROOT / "experiments" / name
    out = tmp_path / name
    assert cli.main(["ablate", str(folder), "--quick", "--out", str(out), "mesh.num_devices=1"]) == 0
    ab = load_ablation(folder)
    text = (out / "results.md").read_text()
    steps = grid(folder, ab, quick=True)[0][2].train.steps
    for variant in ab.variants:
        assert f"| {variant} |" in text
        rows = metrics(out / variant / "seed0")
        assert rows[-1]["step"] == steps and "eval/accuracy" in rows[-1]
    for spec in ab.plots:
        assert (out / spec.file).read_bytes()[:8] == PNG
    # runs sharing model, data and warm start share the first run's warm start
    first, *others = [out / v / "seed0" / "warm_start" / "model.safetensors" for v in ab.variants]
    assert all(o.read_bytes() == first.read_bytes() for o in others)
    return out, ab


@pytest.mark.slow
def test_length_bias_quick_grid_and_rerun(tmp_path):
    out, ab = _quick("ablate_length_bias", tmp_path)
    text = (out / "results.md").read_text()
    assert "last:length/incorrect_mean" in text and "final:eval/accuracy/level_2" in text
    before = {v: metrics(out / v / "seed0") for v in ab.variants}
    assert cli.main(["ablate", str(ROOT / "experiments" / "ablate_length_bias"), "--quick", "--out", str(out),
                     "mesh.num_devices=1"]) == 0  # complete runs are skipped, the report is rewritten
    assert {v: metrics(out / v / "seed0") for v in ab.variants} == before


def test_difficulty_bias_grids_build():
    """Both difficulty grids build every run's config (their runs end to end: the length-bias and compare quick
    grids, and dynamic groups by level in ``test_dynamic_groups_and_running_moments_resume_exactly``)."""
    folder = ROOT / "experiments" / "ablate_difficulty_bias"
    near = grid(folder, load_ablation(folder), quick=True)
    far = grid(folder, load_ablation(folder, "far_levels.yaml"), quick=False)
    assert {c.data.levels for _, _, c in near} == {(1, 2)} and {c.data.levels for _, _, c in far} == {(1, 3)}
    assert len(far) == 4 * 5 and {n for n, _, c in far if c.rollout.dynamic_group is not None} == {"dynamic_group"}


@pytest.mark.slow
def test_compare_quick_grid_reports_memory_variance_and_ratios(tmp_path):
    out, _ = _quick("compare_ppo_dpo", tmp_path)
    table = json.loads((out / "results.json").read_text())
    for kind in ("grpo", "ppo", "ppo_separate", "dpo"):
        assert table[kind]["final:memory/train_step/peak_bytes"][0] > 0
        assert np.isfinite(table[kind]["mean:train/grad_rel_var"][0])
    # the value head (params, Adam moments, values) makes PPO's train step hold more than GRPO's
    assert (table["ppo"]["final:memory/train_step/peak_bytes"][0]
            > table["grpo"]["final:memory/train_step/peak_bytes"][0])
    assert np.isnan(table["grpo"]["final:memory/value_pass/peak_bytes"][0])
    assert table["ppo"]["final:memory/value_pass/peak_bytes"][0] > 0
    assert table["dpo"]["final:memory/reference_params_bytes"][0] > 0  # DPO scores against a held reference
    # a second decoder with its own Adam moments: PPO's train step with a separate critic holds much more
    assert (table["ppo_separate"]["final:memory/train_step/peak_bytes"][0]
            > 1.3 * table["ppo"]["final:memory/train_step/peak_bytes"][0])
    text = (out / "results.md").read_text()
    assert "Ratio of each variant's seed mean to `ppo_separate`'s" in text and "Paired difference to" in text


def test_dynamic_groups_and_running_moments_resume_exactly(tmp_path):
    from grpo_jax.experiment import load_experiment
    from grpo_jax.loop import train

    exp = write_experiment(tmp_path / "exp", tiny_experiment(
        data={"levels": [1, 2]}, train={"steps": 4, "batch_prompts": 4},
        rollout={"dynamic_group": {"min_size": 2, "max_size": 6, "key": "level"}},
        algo={"preset": "grpo", "loss": {"beta": 0.0}, "advantage": {"baseline": "running", "scale": "running"}},
        rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1}))
    cfg = load_experiment(exp, ["mesh.num_devices=1"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, show_progress=False)
    train(cfg, cut, show_progress=False)
    shutil.rmtree(cut / "checkpoints" / "4")  # as if the run had died after step 2's checkpoint
    assert train(cfg, cut, show_progress=False)["start_step"] == 2
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(full))
    rows = metrics(full)
    assert [r["group/rows_used"] for r in rows[1:]] and all(r["group/rows_used"] <= 16 for r in rows[1:])
    assert all(r["mech/weight_share/level_1"] + r["mech/weight_share/level_2"] == pytest.approx(1.0) for r in rows[1:])
    assert len({(r["group/size_min"], r["group/size_max"]) for r in rows[1:]}) > 1  # sizes follow the history
    assert rows[-1]["adv/running_std"] > 0 and "accuracy/level_2" in rows[-1]


@pytest.mark.parametrize("bad, match", [
    ({"rollout": {"dynamic_group": {"min_size": 8}}}, "min_size=8 must be <= rollout.group_size=4"),
    ({"rollout": {"dynamic_group": {}}, "train": {"steps": 2, "batch_prompts": 4, "mask_zero_variance": True}},
     "mask_zero_variance=false"),
    ({"algo": {"preset": "ppo", "advantage": {"token_alpha": 0.1}}}, "token_alpha"),
    ({"train": {"steps": 2, "batch_prompts": 4, "grad_variance": True}}, "micro_batches >= 2"),
])
def test_option_config_errors(tmp_path, bad, match):
    from grpo_jax.experiment import load_experiment

    with pytest.raises(ConfigError, match=match):
        load_experiment(write_experiment(tmp_path / "exp", tiny_experiment(**bad)))
