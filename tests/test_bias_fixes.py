"""GRPO bias fixes by hand: cross-group baselines, running normalisation, multi-scale advantages, dynamic group size."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import (
    AdvantageConfig,
    RunningMoments,
    compute_advantages,
    compute_advantages_with_state,
    group_advantages,
    multiscale_advantages,
    normalized_advantages,
    reward_to_go,
    running_moments_update,
)
from grpo_jax.group_size import allocate_group_sizes, ragged_group_ids


def test_batch_baseline_is_shared_across_groups():
    # groups (1, 1) and (0, 1); batch mean .75. The constant group keeps +.25: it did better than the batch.
    r = jnp.array([1.0, 1, 0, 1])
    np.testing.assert_allclose(normalized_advantages(r, 2, baseline="batch", scale="none"), [0.25, 0.25, -0.75, 0.25])
    # unbiased batch std: (3·.25² + .75²)/3 = .25 -> .5
    np.testing.assert_allclose(normalized_advantages(r, 2, baseline="batch", scale="batch", eps=0.0),
                               [0.5, 0.5, -1.5, 0.5])
    # a constant batch of inexact values gives exactly 0 (not rounding noise / eps), even with eps = 0
    for scale in ("batch", "none"):
        np.testing.assert_array_equal(
            normalized_advantages(jnp.full(6, 0.1), 3, baseline="batch", scale=scale, eps=0.0), 0.0)
    # baseline "group" is group_advantages itself
    r = jnp.array([1.0, 0, 0.5, 0.5, 2, 0])
    for scale in ("group", "batch", "none"):
        np.testing.assert_array_equal(normalized_advantages(r, 2, scale=scale), group_advantages(r, 2, scale=scale))


def test_running_moments_update_by_hand():
    # batch 1 (0, 1, 1, 1): the first update takes the batch moments: mean .75, population var 3/16
    s1 = running_moments_update(RunningMoments.zeros(), jnp.array([0.0, 1, 1, 1]), momentum=0.9)
    np.testing.assert_allclose([s1.mean, s1.var, s1.count], [0.75, 0.1875, 1], rtol=1e-6)
    # batch 2 (1, 1, 1, 1): δ = .25, m = .75 + .1·.25, s² = .9·.1875 + .1·0 + .9·.1·.25²
    s2 = running_moments_update(s1, jnp.ones(4), momentum=0.9)
    np.testing.assert_allclose([s2.mean, s2.var, s2.count], [0.775, 0.9 * 0.1875 + 0.9 * 0.1 * 0.0625, 2], rtol=1e-6)
    # only valid rewards count; a batch without any leaves the state as it was
    s = running_moments_update(RunningMoments.zeros(), jnp.array([0.0, 1, 9]), momentum=0.9,
                               valid_B=jnp.array([1, 1, 0]))
    np.testing.assert_allclose([s.mean, s.var], [0.5, 0.25], rtol=1e-6)
    same = running_moments_update(s2, jnp.ones(3), momentum=0.9, valid_B=jnp.zeros(3, bool))
    np.testing.assert_array_equal(np.array(same), np.array(s2))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        running_moments_update(s2, jnp.ones(3), momentum=1.0)


def test_running_baseline_and_scale_by_hand():
    cfg = AdvantageConfig(baseline="running", scale="running", momentum=0.9)
    adv1, s1 = compute_advantages_with_state(jnp.array([0.0, 1, 1, 1]), 4, cfg, RunningMoments.zeros())
    np.testing.assert_allclose(adv1, (np.array([0, 1, 1, 1]) - 0.75) / (math.sqrt(0.1875) + 1e-6), rtol=1e-5)
    # an all-solved group against the running mean .775 gets a positive advantage, not 0
    adv2, s2 = compute_advantages_with_state(jnp.ones(4), 4, cfg, s1)
    var2 = 0.9 * 0.1875 + 0.9 * 0.1 * 0.0625
    np.testing.assert_allclose(adv2, [(1 - 0.775) / (math.sqrt(var2) + 1e-6)] * 4, rtol=1e-5)
    # group baseline, running scale (adaptive normalisation): group-centred / sqrt(running var); constant group 0
    cfg = AdvantageConfig(baseline="group", scale="running", momentum=0.9, eps=0.0)
    adv, _ = compute_advantages_with_state(jnp.array([0.0, 1, 1, 1]), 2, cfg, RunningMoments.zeros())
    np.testing.assert_allclose(adv, [-0.5 / math.sqrt(0.1875), 0.5 / math.sqrt(0.1875), 0, 0], rtol=1e-6)
    # a constant group of inexact values is exactly 0 (in float32, sum(7 × 0.1)/7 - 0.1 = -7.5e-9)
    adv, _ = compute_advantages_with_state(jnp.array([0.0, 1, 0, 1, 0, 1, 0] + [0.1] * 7), 7, cfg,
                                           RunningMoments.zeros())
    np.testing.assert_array_equal(adv[7:], 0.0)
    # running baseline, no scale: r - mean
    adv, _ = compute_advantages_with_state(jnp.ones(2), 2,
                                           AdvantageConfig(baseline="running", scale="none", momentum=0.9), s1)
    np.testing.assert_allclose(adv, [1 - 0.775] * 2, rtol=1e-6)


def test_constant_history_gives_exact_zero_and_jit():
    cfg = AdvantageConfig(baseline="running", scale="running", eps=0.0)
    step = jax.jit(compute_advantages_with_state, static_argnums=(1, 2))
    state = RunningMoments.zeros()
    for _ in range(3):
        adv, state = step(jnp.full(6, 0.1, jnp.bfloat16), 3, cfg, state)
        assert adv.dtype == jnp.float32
        np.testing.assert_array_equal(adv, 0.0)
    assert float(state.var) == 0.0 and int(state.count) == 3


def test_choices_are_validated():
    with pytest.raises(ValueError,
                       match=r"scale='group' cannot follow baseline='batch'.*\['batch', 'running', 'none'\]"):
        AdvantageConfig(baseline="batch", scale="group")
    with pytest.raises(ValueError, match=r"scale='batch' cannot follow baseline='running'"):
        normalized_advantages(jnp.ones(4), 2, baseline="running", scale="batch", running=RunningMoments.zeros())
    with pytest.raises(ValueError, match="needs running=RunningMoments"):
        normalized_advantages(jnp.ones(4), 2, baseline="batch", scale="running")
    with pytest.raises(ValueError, match="compute_advantages_with_state"):
        compute_advantages(jnp.ones(4), 2, AdvantageConfig(baseline="running", scale="none"))
    with pytest.raises(ValueError, match=r"baseline='median'; choose one of \['group', 'batch', 'running'\]"):
        AdvantageConfig(baseline="median")
    with pytest.raises(ValueError, match="own leave-one-out baseline"):
        AdvantageConfig(estimator="rloo", baseline="batch", scale="none")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        AdvantageConfig(momentum=1.0)
    with pytest.raises(ValueError, match=r"token_norm='token'; choose one of \['none', 'batch', 'group'\]"):
        AdvantageConfig(token_norm="token")
    np.testing.assert_allclose(
        compute_advantages(jnp.array([1.0, 1, 0, 1]), 2, AdvantageConfig(baseline="batch", scale="none")),
        [0.25, 0.25, -0.75, 0.25])


def test_multiscale_by_hand():
    adv_B = jnp.array([1.0, -1.0])
    u = jnp.array([[1.0, 2, 3], [4, jnp.nan, jnp.nan]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    out = multiscale_advantages(adv_B, u, mask, alpha=0.5)
    np.testing.assert_allclose(out, [[1.5, 2.0, 2.5], [-1 + 2.0, 0, 0]], rtol=1e-6)
    # batch: valid u (1, 2, 3, 4), mean 2.5, population var 1.25
    out = multiscale_advantages(adv_B, u, mask, alpha=0.5, normalize="batch", eps=0.0)
    z = lambda x: (x - 2.5) / math.sqrt(1.25)  # noqa: E731
    np.testing.assert_allclose(out, [[1 + 0.5 * z(1), 1 + 0.5 * z(2), 1 + 0.5 * z(3)], [-1 + 0.5 * z(4), 0, 0]],
                               rtol=1e-6)


def test_multiscale_group_normalisation_by_hand():
    # group 0 = rows 0, 1: tokens (1, 3 | 5): mean 3, population var 8/3; group 1 = rows 2, 3: all 2 -> exactly 0
    adv_B = jnp.array([1.0, -1.0, 0.5, -0.5])
    u = jnp.array([[1.0, 3], [5, 9], [2, 2], [2, 2]])
    mask = jnp.array([[1, 1], [1, 0], [1, 1], [1, 1]])
    out = multiscale_advantages(adv_B, u, mask, alpha=2.0, normalize="group", group_size=2, eps=0.0)
    s = math.sqrt(8 / 3)
    np.testing.assert_allclose(out, [[1 + 2 * (-2 / s), 1.0], [-1 + 2 * (2 / s), 0], [0.5, 0.5], [-0.5, -0.5]],
                               rtol=1e-6)
    # ragged ids: row 3 is padding (id -1) and gets 0; group 1 is row 2 alone (constant -> 0)
    out = multiscale_advantages(adv_B, u, mask, alpha=2.0, normalize="group", group_ids_B=jnp.array([0, 0, 1, -1]),
                                num_groups=2, eps=0.0)
    np.testing.assert_allclose(out[3], [0, 0])
    np.testing.assert_allclose(out[2], [0.5, 0.5])
    # a KL return-to-go as the token term: reward_to_go((1, 2, -)) = (3, 2, 0)
    np.testing.assert_allclose(reward_to_go(jnp.array([[1.0, 2, 7]]), jnp.array([[1, 1, 0]])), [[3, 2, 0]])


def test_allocate_group_sizes_by_hand():
    # w = sqrt(p(1-p)) + .1 = (.6, .1, .1); L = 10 each; 2 samples each cost 60 of 300 -> 24 more samples.
    # Levels k/w: prompt 0's k = 3..16 at 5 .. 26.7 all come before prompts 1, 2 (k/0.1 = 30, 40, ...);
    # prompt 0 stops at max 16 (14 samples), the other 10 alternate over prompts 1, 2 up to level 70: k = 7.
    sizes = allocate_group_sizes([0.5, 1.0, 0.0], token_budget=300, mean_length_P=[10, 10, 10], min_size=2, max_size=16)
    np.testing.assert_array_equal(sizes, [16, 7, 7])
    # a tie at the same level goes to the lower index: 10 tokens left buy one sample
    np.testing.assert_array_equal(
        allocate_group_sizes([0.5, 0.5], token_budget=50, mean_length_P=[10, 10], min_size=2, max_size=8), [3, 2])
    # lengths differ: w = (.6, .1), L = (30, 10), base 40 of 110 -> left 70: prompt 0 k=2 (left 40), k=3 (10),
    # k=4 costs 30 > 10 and is skipped, prompt 1 k=2 costs 10 and fits: 3·30 + 2·10 = 110
    np.testing.assert_array_equal(
        allocate_group_sizes([0.5, 0.0], token_budget=110, mean_length_P=[30, 10], min_size=1, max_size=4), [3, 2])
    # the weight is the Bernoulli std: p = (.5, .1) -> w = (.6, .4); L = 10, base 20 of 100 buys 8 entries at
    # levels 2/.6, 3/.6, 2/.4, 4/.6, 3/.4, 5/.6, 6/.6, 4/.4 (= 10; next 7/.6 = 11.7): prompt 0 gets 5, prompt 1 gets 3
    np.testing.assert_array_equal(
        allocate_group_sizes([0.5, 0.1], token_budget=100, mean_length_P=[10, 10], min_size=1, max_size=10), [6, 4])
    with pytest.raises(ValueError, match="cannot pay min_size=2"):
        allocate_group_sizes([0.5, 0.5], token_budget=30, mean_length_P=[10, 10], min_size=2, max_size=4)
    with pytest.raises(ValueError, match=r"prev_success_P must lie in \[0, 1\]"):
        allocate_group_sizes([1.5], token_budget=30, mean_length_P=[10], min_size=1, max_size=4)


def test_allocation_respects_budget_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, lengths = rng.uniform(size=8).round(1), rng.integers(5, 50, 8).astype(float)
        budget = float(rng.integers(3 * lengths.sum(), 12 * lengths.sum()))
        n = allocate_group_sizes(p, token_budget=budget, mean_length_P=lengths, min_size=3, max_size=12)
        assert n.min() >= 3 and n.max() <= 12 and float(n @ lengths) <= budget
        assert np.all(lengths[n < 12] > budget - float(n @ lengths))  # no affordable sample left out
        mixed, solved = np.argmax(p * (1 - p)), np.argmin(p * (1 - p))
        assert n[mixed] >= n[solved]


def test_ragged_group_ids_feed_group_advantages():
    ids = ragged_group_ids(np.array([2, 3]), 6)
    np.testing.assert_array_equal(ids, [0, 0, 1, 1, 1, -1])
    # group 0 (1, 0): ±.5/√.5; group 1 (2, 4, 0): mean 2, std 2; padding 0
    r = jnp.array([1.0, 0, 2, 4, 0, 9])
    adv = group_advantages(r, None, group_ids_B=jnp.asarray(ids), num_groups=2, eps=0.0)
    np.testing.assert_allclose(adv, [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0, 1, -1, 0], rtol=1e-6)
    # batch baseline over the 5 valid rewards only: mean 7/5; padding stays 0
    adv = normalized_advantages(r, None, baseline="batch", scale="none", group_ids_B=jnp.asarray(ids), num_groups=2)
    np.testing.assert_allclose(adv, [1 - 1.4, -1.4, 2 - 1.4, 4 - 1.4, -1.4, 0], rtol=1e-6)
    # allocation -> layout -> advantages: each ragged group is normalised on its own
    sizes = allocate_group_sizes([0.5, 1.0, 0.0], token_budget=300, mean_length_P=[10, 10, 10], min_size=2, max_size=16)
    r = jnp.asarray(np.random.default_rng(0).integers(0, 2, 32), jnp.float32)
    adv = group_advantages(r, None, group_ids_B=jnp.asarray(ragged_group_ids(sizes, 32)), num_groups=3)
    for lo, hi in ((0, 16), (16, 23), (23, 30)):
        np.testing.assert_allclose(adv[lo:hi], group_advantages(r[lo:hi], hi - lo), rtol=1e-6)
    np.testing.assert_array_equal(adv[30:], 0.0)
    with pytest.raises(ValueError, match="pad_to=4 is smaller than the 5 samples"):
        ragged_group_ids(np.array([2, 3]), 4)
