"""The timeout worker pool: raising, hanging and dying reward calls score 0, are counted, and the pool survives.

The reward functions live at module level so spawned workers can import them by reference.
"""
import os
import time

import numpy as np
import pytest

from grpo_jax.rewards import RewardPool, RewardsConfig, RewardSpec, compute_rewards

TIMEOUT_S = 0.5


def flaky(prompt, completion, example, *, bonus=0.0):
    if example["mode"] == "raise":
        raise RuntimeError("verifier bug")
    if example["mode"] == "hang":
        time.sleep(60)
    if example["mode"] == "die":
        os._exit(3)
    return 1.0 + bonus


def slow_ok(prompt, completion, example):
    time.sleep(0.05)
    return 2.0


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2) as p:
        yield p


def test_map_turns_raise_hang_and_death_into_outcomes(pool):
    modes = ["ok", "raise", "hang", "ok", "die", "ok"]
    outcomes = pool.map(flaky, [("p", "c", {"mode": m}) for m in modes], {"bonus": 0.5}, timeout_s=TIMEOUT_S)
    assert [o.error for o in outcomes] == [None, "RuntimeError", "Timeout", None, "WorkerDied", None]
    assert [o.value for o in outcomes] == [1.5, None, None, 1.5, None, 1.5]
    assert "RuntimeError: verifier bug" in outcomes[1].traceback
    # The hung and dead workers were replaced: the pool still has two live workers that answer.
    assert len(pool._workers) == 2 and all(w.proc.is_alive() for w in pool._workers)
    outcomes = pool.map(slow_ok, [("p", "c", {})] * 4, {}, timeout_s=TIMEOUT_S)
    assert [o.value for o in outcomes] == [2.0] * 4


def test_timeout_starts_after_a_cold_worker_has_loaded_the_task():
    # A fresh worker must start Python and import this module (numpy, jax, grpo_jax: well over 0.2 s) before it
    # can run slow_ok; that start-up is not charged to the 0.2 s per-call timeout.
    with RewardPool(1) as cold:
        start = time.monotonic()
        outcomes = cold.map(slow_ok, [("p", "c", {})] * 3, {}, timeout_s=0.2)
        assert time.monotonic() - start > 0.2
    assert [o.value for o in outcomes] == [2.0] * 3


def test_compute_rewards_scores_failures_zero_and_counts_them(pool):
    cfg = RewardsConfig(
        fns=(
            RewardSpec(name=f"{__name__}:flaky"),
            RewardSpec(name="exact_int", weight=10.0),
        ),
        timeout_s=TIMEOUT_S,
    )
    modes = ["ok", "raise", "ok", "hang"]
    examples = [{"mode": m, "answer": "7"} for m in modes]
    completions = ["7", "7", "8", "7"]
    start = time.monotonic()
    total, m = compute_rewards(cfg, ["p"] * 4, completions, examples, group_size=2, pool=pool)
    assert time.monotonic() - start < 5  # the hang cost about one timeout, not 60 s
    # flaky: 1, 0 (raised), 1, 0 (timed out); exact_int x10: 10, 10, 0, 10
    np.testing.assert_array_equal(total, [11.0, 10.0, 1.0, 10.0])
    assert m[f"reward/{__name__}:flaky/errors"] == 2 and m[f"reward/{__name__}:flaky/mean"] == 0.5
    assert m["reward/exact_int/errors"] == 0 and m["reward/exact_int/mean"] == 0.75


def test_math_verify_runs_in_a_temporary_pool_when_none_is_given():
    cfg = RewardsConfig(fns=(RewardSpec(name="math_verify"),), num_workers=1, timeout_s=30.0)
    completions = [r"so \boxed{\frac{1}{2}}", r"\boxed{\frac{1}{3}}"]
    total, m = compute_rewards(cfg, ["p"] * 2, completions, [{"answer": "0.5"}] * 2, group_size=2)
    np.testing.assert_array_equal(total, [1.0, 0.0])
    assert m["reward/math_verify/errors"] == 0


def test_unpicklable_reward_is_a_clear_error(pool):
    with pytest.raises(TypeError, match="isolated rewards must be module-level functions"):
        pool.map(lambda p, c, e: 1.0, [("p", "c", {})], {}, timeout_s=TIMEOUT_S)
