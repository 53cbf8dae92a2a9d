"""Hostile reward values and the inline time budget: whatever a reward returns, or however long it takes, the batch
is scored, the total is finite, and the cause is counted.

The reward functions live at module level so spawned pool workers can import them by reference.
"""
import logging
import math
from decimal import Decimal
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.rewards import RewardPool, RewardsConfig, RewardSpec, compute_rewards, register_reward
from grpo_jax.rewards.pool import BUDGET_SPENT, run_inline
from grpo_jax.rewards.scores import MAX_ABS_SCORE


class RaisingFloat(float):
    """A float subclass whose conversion raises: isinstance says "real number", float() says otherwise."""

    def __float__(self):
        raise RuntimeError("no float for you")


class HasFloat:
    """Converts to a float, but is no number type: not accepted."""

    def __float__(self):
        return 1.0


# case -> (make the value, expected score, expected invalid count); the value is made where the reward runs
HOSTILE = {
    "huge_int": (lambda: 10**400, 0.0, 1),  # float(10**400) raises OverflowError
    "huge_negative_int": (lambda: -(10**400), 0.0, 1),
    "huge_fraction": (lambda: Fraction(10**400, 3), 0.0, 1),
    "int_past_max_abs": (lambda: 10**10, 0.0, 1),  # finite, but > MAX_ABS_SCORE = 1e9
    "float_past_float32": (lambda: 1e39, 0.0, 1),
    "int_at_max_abs": (lambda: -(10**9), -1e9, 0),
    "decimal": (lambda: Decimal("0.25"), 0.25, 0),
    "decimal_overflowing": (lambda: Decimal("1e400"), 0.0, 1),  # float() gives inf
    "decimal_snan": (lambda: Decimal("sNaN"), 0.0, 1),  # float() raises ValueError
    "fraction": (lambda: Fraction(3, 4), 0.75, 0),
    "bool": (lambda: True, 1.0, 0),
    "numpy_bool": (lambda: np.bool_(True), 1.0, 0),
    "numpy_float32": (lambda: np.float32(0.5), 0.5, 0),
    "numpy_int64": (lambda: np.int64(-3), -3.0, 0),
    "numpy_nan": (lambda: np.float64("nan"), 0.0, 1),
    "zero_d_array": (lambda: np.array(0.75), 0.75, 0),
    "zero_d_jax_array": (lambda: jnp.asarray(0.5, jnp.float32), 0.5, 0),
    "zero_d_object_array_huge_int": (lambda: np.array(10**400, dtype=object), 0.0, 1),
    "one_element_array": (lambda: np.array([0.75]), 0.0, 1),  # a batch-shaped value from a sample reward: a bug
    "str": (lambda: "1.0", 0.0, 1),
    "bytes": (lambda: b"1", 0.0, 1),
    "list": (lambda: [1.0], 0.0, 1),
    "none": (lambda: None, 0.0, 1),
    "nan": (lambda: math.nan, 0.0, 1),
    "inf": (lambda: math.inf, 0.0, 1),
    "neg_inf": (lambda: -math.inf, 0.0, 1),
    "complex": (lambda: 1 + 0j, 0.0, 1),
    "raising_float": (lambda: RaisingFloat(2.0), 0.0, 1),
    "object_with_float": (lambda: HasFloat(), 0.0, 1),
}
assert len(HOSTILE) >= 12


def hostile(prompt, completion, example):
    """Returns the case's hostile value, or 1.0 for the well-behaved sample."""
    return 1.0 if example["case"] == "ok" else HOSTILE[example["case"]][0]()


register_reward("test_hostile_inline", hostile, isolated=False)
ISOLATED = f"{__name__}:hostile"  # a "module:function" path: run in the worker pool


@pytest.fixture(scope="module")
def pool():
    with RewardPool(1) as p:
        yield p


def _score(name, cases, pool):
    cfg = RewardsConfig(fns=(RewardSpec(name=name),), timeout_s=30.0)
    examples = [{"case": c} for c in cases]
    return compute_rewards(cfg, ["p"] * len(cases), ["c"] * len(cases), examples, group_size=len(cases), pool=pool)


@pytest.mark.parametrize("path", ["inline", "isolated"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_value_scores_finite_and_is_counted(case, path, pool):
    name = "test_hostile_inline" if path == "inline" else ISOLATED
    _, score, invalid = HOSTILE[case]
    total, m = _score(name, [case, "ok"], pool)  # the well-behaved sample in the same batch keeps its 1.0
    np.testing.assert_array_equal(total, np.array([score, 1.0], np.float32))
    assert m[f"reward/{name}/invalid"] == invalid
    assert m[f"reward/{name}/errors"] == 0 and m[f"reward/{name}/timed_out"] == 0
    assert math.isfinite(m["reward/total/mean"]) and math.isfinite(m["reward/total/std"])


@pytest.mark.parametrize("path", ["inline", "isolated"])
def test_whole_table_in_one_batch_warns_once(path, pool, caplog):
    name = "test_hostile_inline" if path == "inline" else ISOLATED
    cases = sorted(HOSTILE)
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.combine"):
        total, m = _score(name, cases, pool)
    np.testing.assert_array_equal(total, np.array([HOSTILE[c][1] for c in cases], np.float32))
    assert m[f"reward/{name}/invalid"] == sum(HOSTILE[c][2] for c in cases) == 20
    warned = [r.getMessage() for r in caplog.records if repr(name) in r.getMessage()]
    assert len(warned) == 1  # once per reward per batch, not per sample
    # sorted(HOSTILE)[0] is "bool" (valid); the first invalid one is "bytes"
    assert f"20 of {len(cases)} values" in warned[0] and "the first: bytes b'1'" in warned[0]


def test_max_abs_score_is_the_documented_bound():
    assert MAX_ABS_SCORE == 1e9  # the "int_at_max_abs" / "int_past_max_abs" rows above rely on it


# ---------------------------------------------------------------- group/batch rewards: the per-block value

BLOCK = {  # case -> (the value a batch reward returns for 4 samples, expected values_B, expected invalid count)
    "good_list": ([1, 0.5, True, np.float32(2)], [1, 0.5, 1, 2], 0),
    "jax_array": (jnp.arange(4.0), [0, 1, 2, 3], 0),
    "hostile_elements": ([10**400, "x", None, 0.25], [0, 0, 0, 0.25], 3),
    "nan_in_array": (np.array([np.nan, 1.0, np.inf, -1.0]), [0, 1, 0, -1], 2),
    "too_short": ([1.0, 1.0, 1.0], [0, 0, 0, 0], 4),  # the wrong length: the whole block is invalid
    "too_long": ([1.0] * 5, [0, 0, 0, 0], 4),
    "two_dimensional": ([[1.0]] * 4, [0, 0, 0, 0], 4),
    "ragged": ([1.0, [2.0, 3.0], 1.0, 1.0], [1, 0, 1, 1], 1),
    "scalar": (1.0, [0, 0, 0, 0], 4),
    "string_of_4": ("1111", [0, 0, 0, 0], 4),
    "none": (None, [0, 0, 0, 0], 4),
    "generator": ((x for x in [1.0] * 4), [0, 0, 0, 0], 4),
}


def block_reward(prompts, completions, examples):
    return BLOCK[examples[0]["case"]][0]


register_reward("test_hostile_block", block_reward, kind="batch", isolated=False)


@pytest.mark.parametrize("case", sorted(BLOCK))
def test_hostile_batch_reward_value(case):
    _, expected, invalid = BLOCK[case]
    total, m = _score("test_hostile_block", [case] * 4, None)
    np.testing.assert_array_equal(total, np.array(expected, np.float32))
    assert m["reward/test_hostile_block/invalid"] == invalid and m["reward/test_hostile_block/errors"] == 0


# ---------------------------------------------------------------- the inline time budget


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    "step, ran",
    [
        (0.25, 4),  # calls start at 0, .25, .5, .75 (elapsed < 1); the 5th would start at 1.0 >= 1.0: not made
        (0.3, 4),  # starts 0, .3, .6, .9; the 4th crosses the budget (ends at 1.2) and keeps its value
        (2.0, 1),  # the first call alone spends the budget; it keeps its value
        (0.0, 16),  # instant calls: the budget is never reached
    ],
)
def test_inline_budget_keeps_the_crossing_call_and_skips_the_rest(step, ran):
    clock = FakeClock()

    def reward(i):
        clock.now += step
        return float(i)

    outcomes = run_inline(reward, [(i,) for i in range(16)], {}, budget_s=1.0, clock=clock)
    assert [o.value for o in outcomes[:ran]] == [float(i) for i in range(ran)]
    assert all(o.error is None for o in outcomes[:ran])
    assert [o.error for o in outcomes[ran:]] == [BUDGET_SPENT] * (16 - ran)
    assert clock.now == pytest.approx(100.0 + step * ran)  # the skipped calls were never made


def sleepy(prompt, completion, example):
    import time

    time.sleep(0.05)
    return 1.0


register_reward("test_sleepy_inline", sleepy, isolated=False)


def test_inline_budget_in_compute_rewards(caplog):
    cfg = RewardsConfig(fns=(RewardSpec(name="test_sleepy_inline"), RewardSpec(name="exact_int")), inline_timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.combine"):
        total, m = compute_rewards(cfg, ["p"] * 16, ["7"] * 16, [{"answer": "7"}] * 16, group_size=4)
    # Call i starts after >= 0.05 * i s of sleeping, so calls 4.. start at >= 0.2 s and are never made: at most 4
    # run (fewer only if the machine oversleeps), and they are the first ones.
    ran = 16 - int(m["reward/test_sleepy_inline/timed_out"])
    assert 1 <= ran <= 4
    np.testing.assert_array_equal(total, [2.0] * ran + [1.0] * (16 - ran))  # exact_int (its own budget) scored all
    assert m["reward/test_sleepy_inline/errors"] == 0 and m["reward/test_sleepy_inline/invalid"] == 0
    assert m["reward/exact_int/timed_out"] == 0
    warned = [r.getMessage() for r in caplog.records if "test_sleepy_inline" in r.getMessage()]
    assert len(warned) == 1 and f"{16 - ran} of 16 samples not scored" in warned[0]


def test_inline_timeout_config():
    assert RewardsConfig(fns=(RewardSpec(name="exact_int"),)).inline_timeout_s == 60.0
    assert RewardsConfig(fns=(RewardSpec(name="exact_int"),), inline_timeout_s=None).inline_timeout_s is None
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="RewardsConfig.inline_timeout_s must be a finite number of seconds > 0"):
            RewardsConfig(fns=(RewardSpec(name="exact_int"),), inline_timeout_s=bad)
    from grpo_jax.config import from_dict

    raw = {"fns": [{"name": "exact_int"}]}
    assert from_dict(RewardsConfig, {**raw, "inline_timeout_s": None}).inline_timeout_s is None
    assert from_dict(RewardsConfig, {**raw, "inline_timeout_s": 5}).inline_timeout_s == 5.0
