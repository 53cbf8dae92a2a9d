"""Golden metrics: a 3-step run of every algorithm kind and of the stateful GRPO options equals the numbers recorded
before the loop and the algorithms were restructured (tests/golden_metrics.json), timing fields aside.

    GOLDEN_WRITE=1 python -m pytest tests/test_golden.py   # re-record: only for a deliberate change of behaviour
"""
import json
import math
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden_metrics.json"
VARYING = {"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1}
RUNS = {
    "grpo": {"algo": {"preset": "grpo"}},
    "ppo": {"algo": {"preset": "ppo"}},
    "dpo": {"algo": {"preset": "dpo"}},
    "hybrid": {"algo": {"preset": "hybrid"}},
    "dynamic_group": {"data": {"levels": [1, 2]}, "train": {"micro_batches": 1},
                      "rollout": {"dynamic_group": {"min_size": 2, "max_size": 6, "key": "level"}}},
    "running_baseline": {"algo": {"preset": "grpo", "advantage": {"baseline": "running", "scale": "running"}}},
    "multiscale": {"algo": {"preset": "grpo", "advantage": {"token_alpha": 0.5}}},
    "kl_in_reward": {"algo": {"preset": "dr_grpo", "loss": {"beta": 0.05}}, "train": {"kl_in_reward": True}},
}


def run(name: str, folder: Path) -> list[dict]:
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig
    from grpo_jax.loop import train
    from grpo_jax.tracking import TIMING_KEYS

    from loop_helpers import metrics, tiny_experiment

    sections = {"rewards": VARYING, "mesh": {"data": 1, "num_devices": 1}, "eval": {"num_examples": 0},
                "checkpoint": {"every": 10, "async_save": False}, **RUNS[name]}
    sections["train"] = {"steps": 3, "batch_prompts": 4, "micro_batches": 2, **sections.get("train", {})}
    train(from_dict(ExperimentConfig, tiny_experiment(**sections)), folder / name, show_progress=False)
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in metrics(folder / name)]


# Metrics the restructuring removed on purpose: DPO used to compute GRPO advantages it never used, and logged them.
REMOVED = {"dpo": {"adv/mean", "adv/std", "adv/abs_mean"}}
# the rollout/trainer mismatch, logged since issue 16 by every kind with a policy ratio; the bias mechanisms (issue 17)
ADDED = ("train/mismatch/", "mech/")


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_equal_the_golden_file(tmp_path, name):
    rows = run(name, tmp_path)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("GOLDEN_WRITE"):
        GOLDEN.write_text(json.dumps({**recorded, name: rows}, indent=1, sort_keys=True) + "\n")
        return
    golden = [{k: v for k, v in g.items() if k not in REMOVED.get(name, ())} for g in recorded[name]]
    assert all(("train/mismatch/kl_k3" in r) == (name != "dpo" and r["step"] > 0) for r in rows)
    assert all(("mech/token_weight/incorrect_mean" in r) == (r["step"] > 0) for r in rows)
    rows = [{k: v for k, v in r.items() if not k.startswith(ADDED)} for r in rows]
    assert [sorted(r) for r in rows] == [sorted(g) for g in golden], "a metric appeared or disappeared"
    bad = [(r["step"], k, g[k], r[k]) for r, g in zip(rows, golden) for k in g if not close(r[k], g[k])]
    assert not bad, f"(step, metric, golden, now): {bad[:10]}"
