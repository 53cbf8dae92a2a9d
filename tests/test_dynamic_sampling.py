"""DAPO's dynamic sampling (train.dynamic_sampling): the trained batch is refilled with groups that carry signal,
within a bounded, logged number of extra rounds; the masking alternative keeps its own name."""
import logging

import numpy as np
import pytest

from grpo_jax import loop
from grpo_jax.config import from_dict
from grpo_jax.experiment import ExperimentConfig

from loop_helpers import metrics, tiny_experiment


def run(tmp_path, monkeypatch, reward, rounds, steps=3):
    trained = []
    assemble = loop.assemble

    def capture(run, rs, scored):
        trained.append((np.asarray(scored.rewards_B).reshape(4, 4), np.asarray(scored.keep_B)))
        return assemble(run, rs, scored)

    monkeypatch.setattr(loop, "assemble", capture)
    cfg = tiny_experiment(rewards={"fns": [{"name": f"loop_helpers:{reward}"}], "num_workers": 1},
                          train={"steps": steps, "batch_prompts": 4, "dynamic_sampling": True,
                                 "dynamic_sampling_rounds": rounds},
                          mesh={"num_devices": 1}, eval={"num_examples": 0}, checkpoint={"every": 100})
    loop.train(from_dict(ExperimentConfig, cfg), tmp_path / reward, show_progress=False)
    return trained, [r for r in metrics(tmp_path / reward) if "train/loss" in r]


def test_the_trained_batch_holds_only_groups_whose_rewards_differ(tmp_path, monkeypatch):
    """About half of the questions (even answers) give every sample the same reward: each step draws further rounds
    of 4 prompts until 4 groups carry signal, and trains on exactly those."""
    trained, rows = run(tmp_path, monkeypatch, "odd_signal_reward", rounds=6, steps=4)
    for r_GxN, keep_B in trained:
        assert (r_GxN.max(1) > r_GxN.min(1)).all() and keep_B.all()
    assert [r["dynamic_sampling/kept_groups"] for r in rows] == [4] * 4
    assert all(r["dynamic_sampling/short_groups"] == 0 and 1 <= r["dynamic_sampling/rounds"] <= 7 for r in rows)
    assert all(r["dynamic_sampling/generated_groups"] == 4 * r["dynamic_sampling/rounds"] for r in rows)
    assert sum(r["dynamic_sampling/rounds"] for r in rows) > 4  # some step needed a second round
    # reward/* describe round 0, a plain batch: its zero-variance groups show there, not in the trained batch
    assert any(r["reward/zero_variance_fraction"] > 0 for r in rows)
    assert all(r["kept_frac"] == 1.0 for r in rows)
    assert max(r["train/mismatch/abs_logp_diff"] for r in rows) < 1e-5  # re-padded prompts: same log-probs


def test_extra_rounds_are_bounded_and_a_short_batch_is_masked_and_logged(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="grpo_jax.loop")
    trained, rows = run(tmp_path, monkeypatch, "zero_reward", rounds=2, steps=2)
    assert [r["dynamic_sampling/rounds"] for r in rows] == [3, 3]  # round 0 + 2 extra, no more
    assert [r["dynamic_sampling/short_groups"] for r in rows] == [4, 4]
    assert all(not keep_B.any() for _, keep_B in trained) and all(r["kept_frac"] == 0.0 for r in rows)
    assert sum("zero-variance groups fill the batch, masked" in m for m in caplog.messages) == 2


@pytest.mark.parametrize("train, rollout, match", [
    ({"dynamic_sampling": True, "mask_zero_variance": True}, {}, "are alternatives"),
    ({"dynamic_sampling": True}, {"mode": "one_step_off"}, "needs rollout.mode=sync"),
    ({"dynamic_sampling_rounds": -1}, {}, "dynamic_sampling_rounds must be >= 0"),
])
def test_dynamic_sampling_config_errors(train, rollout, match):
    with pytest.raises(ValueError, match=match):
        from_dict(ExperimentConfig, tiny_experiment(train={"steps": 2, "batch_prompts": 4, **train}, rollout=rollout))
