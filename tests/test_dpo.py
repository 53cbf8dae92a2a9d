"""DPO / IPO on two pairs by hand, online pairs from GRPO groups, and the GRPO+DPO hybrid."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import group_advantages
from grpo_jax.losses import (
    LossConfig,
    dpo_loss,
    dpo_loss_parts,
    finalize_dpo_stats,
    group_preference_pairs,
    grpo_objective,
    hybrid_loss,
    merge_stats,
    sequence_logps,
)

BETA = 0.1
# pair 0: h = (-1 - -2) - (-3 - -2) = 2;  pair 1: h = (-4 - -3) - (-2.5 - -3) = -1.5
PC, PR = jnp.array([-1.0, -4.0]), jnp.array([-3.0, -2.5])
RC, RR = jnp.array([-2.0, -3.0]), jnp.array([-2.0, -3.0])
H = (2.0, -1.5)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo_on_two_pairs_by_hand():
    loss, m = dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert float(loss) == pytest.approx((-log_sigmoid(0.2) - log_sigmoid(-0.15)) / 2, rel=1e-6)
    # implicit rewards β(π - ref): chosen (.1, -.1), rejected (-.1, .05)
    assert float(m["chosen_reward"]) == pytest.approx((0.1 - 0.1) / 2, abs=1e-7)
    assert float(m["rejected_reward"]) == pytest.approx((-0.1 + 0.05) / 2, rel=1e-5)
    assert float(m["reward_margin"]) == pytest.approx((0.2 - 0.15) / 2, rel=1e-5)
    assert float(m["reward_accuracy"]) == 0.5
    # dL/dπ_c = -(1/2)·β·σ(-βh)
    g = jax.grad(lambda pc: dpo_loss(pc, PR, RC, RR, beta=BETA)[0])(PC)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(g, [-0.5 * BETA * sig(-0.2), -0.5 * BETA * sig(0.15)], rtol=1e-5)


def test_label_smoothing_and_ipo_by_hand():
    eps = 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)
    per_pair = [-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h) for h in H]
    assert float(loss) == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    # IPO: (h - 1/(2β))² = (2 - 5)², (-1.5 - 5)²
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, kind="ipo")
    assert float(loss) == pytest.approx((9.0 + 42.25) / 2, rel=1e-6)


def test_invalid_pairs_are_left_out():
    nan = jnp.array([jnp.nan])
    loss, m = dpo_loss(*(jnp.concatenate([x, nan]) for x in (PC, PR, RC, RR)), beta=BETA,
                       valid_P=jnp.array([True, True, False]))
    assert float(loss) == pytest.approx((-log_sigmoid(0.2) - log_sigmoid(-0.15)) / 2, rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    g = jax.grad(lambda pc: dpo_loss(pc, *(jnp.concatenate([x, nan]) for x in (PR, RC, RR)),
                                     valid_P=jnp.array([1, 1, 0]))[0])(jnp.concatenate([PC, nan]))
    assert bool(jnp.all(jnp.isfinite(g))) and float(g[2]) == 0.0
    loss, m = dpo_loss(PC, PR, RC, RR, valid_P=jnp.zeros(2, bool))
    assert float(loss) == 0.0 and float(m["reward_margin"]) == 0.0


def test_pair_parts_merge_exactly():
    args = [jnp.concatenate([x, x + 0.3]) for x in (PC, PR, RC, RR)]
    valid = jnp.array([1, 0, 1, 1])
    full, m_full = dpo_loss(*args, beta=BETA, valid_P=valid)
    parts = [dpo_loss_parts(*(a[c] for a in args), beta=BETA, valid_P=valid[c]) for c in (slice(0, 1), slice(1, 4))]
    assert float((parts[0][0] + parts[1][0]) / (parts[0][1] + parts[1][1])) == pytest.approx(float(full), rel=1e-6)
    merged = finalize_dpo_stats(merge_stats(parts[0][2], parts[1][2]))
    for k, v in m_full.items():
        assert float(merged[k]) == pytest.approx(float(v), rel=1e-6, abs=1e-7), k


def test_sequence_logps_sum_valid_tokens():
    logp = jnp.array([[math.log(0.5), math.log(0.25), -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    np.testing.assert_allclose(sequence_logps(logp, jnp.array([[1, 1, 0], [0, 0, 0]])), [math.log(0.125), 0.0],
                               rtol=1e-6)


def test_group_pairs_ties_and_constant_groups():
    # group 0: best 1 (tie with 2: lower index), worst 0; group 1 constant: no pair; group 2: best 8, worst 9
    rewards = jnp.array([0.0, 1, 1, 0.5, 2, 2, 2, 2, 3, 0, 0, 3])
    chosen, rejected, valid = group_preference_pairs(rewards, 4)
    np.testing.assert_array_equal(chosen, [1, 4, 8])
    np.testing.assert_array_equal(rejected, [0, 4, 9])
    np.testing.assert_array_equal(valid, [True, False, True])
    with pytest.raises(ValueError, match="divisible by group_size=5"):
        group_preference_pairs(rewards, 5)


def test_online_dpo_and_hybrid_by_hand():
    # 2 groups of 2 with rewards (0, 1 | 1, 1): one pair (chosen 1, rejected 0); the constant group gives none.
    # Row 1 has one token. Sequence log-probs (policy, ref): row 0 (-3, -2), row 1 (-.5, -1): h = .5 - (-1) = 1.5
    rewards = jnp.array([0.0, 1, 1, 1])
    logp = jnp.array([[-1.0, -2, 0], [-0.5, 7, 0], [-1, -1, 0], [-1, -1, 0]])
    ref = jnp.array([[-1.0, -1, 0], [-1, 7, 0], [-1, -1, 0], [-1, -1, 0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    c, r, v = group_preference_pairs(rewards, 2)
    pol, rf = sequence_logps(logp, mask), sequence_logps(ref, mask)
    l_dpo, _ = dpo_loss(pol[c], pol[r], rf[c], rf[r], beta=BETA, valid_P=v)
    assert float(l_dpo) == pytest.approx(-log_sigmoid(BETA * 1.5), rel=1e-6)
    # GRPO at ratio 1, no KL: A = (-1/√2, 1/√2, 0, 0), token loss -A; token-mean over 2 + 1 + 2 + 2 tokens
    a = 1 / math.sqrt(2)
    l_grpo, _ = grpo_objective(logp, logp, None, group_advantages(rewards, 2), mask,
                               LossConfig(agg="token-mean", beta=0.0))
    assert float(l_grpo) == pytest.approx((2 * a - a) / 7, rel=1e-5)
    hybrid = hybrid_loss(l_grpo, l_dpo, alpha=0.3)
    assert float(hybrid) == pytest.approx(0.7 * (2 * a - a) / 7 + 0.3 * -log_sigmoid(BETA * 1.5), rel=1e-5)
    assert float(hybrid_loss(2.0, 0.5, alpha=0.25)) == pytest.approx(0.75 * 2.0 + 0.25 * 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        hybrid_loss(1.0, 1.0, alpha=1.5)


def test_jit_bfloat16_and_errors():
    bf = [x.astype(jnp.bfloat16) for x in (PC, PR, RC, RR)]
    loss, m = jax.jit(lambda *a: dpo_loss(*a, beta=BETA))(*bf)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())
    # these values are exact in bf16
    np.testing.assert_allclose(loss, dpo_loss(PC, PR, RC, RR, beta=BETA)[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"kind='kto' is not supported; choose one of \['sigmoid', 'ipo'\]"):
        dpo_loss(PC, PR, RC, RR, kind="kto")
    with pytest.raises(ValueError, match="applies to kind='sigmoid' only"):
        dpo_loss(PC, PR, RC, RR, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match=r"ref_rejected_logp_P has shape \(1,\), expected \(2,\)"):
        dpo_loss(PC, PR, RC, RR[:1])
