"""PPO's critic side by hand: terminal rewards, GAE on a 4-step trajectory, value loss, whitening, the objective."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import gae_advantages, ppo_advantages, reward_to_go, terminal_rewards, whiten
from grpo_jax.losses import (
    LossConfig,
    PPOConfig,
    finalize_ppo_stats,
    merge_stats,
    ppo_objective_parts,
    value_loss_terms,
)

NAN = float("nan")
G, L = 0.9, 0.8  # γ, λ; γλ = 0.72
# the 4-step toy trajectory: reward 1 at the end, V = (.5, .6, .7, .8)
D3 = 1 - 0.8  # δ_t = ρ_t + γ V_{t+1} - V_t, V_4 = 0 (terminal)
D2 = 0 + G * 0.8 - 0.7
D1 = 0 + G * 0.7 - 0.6
D0 = 0 + G * 0.6 - 0.5
A3 = D3
A2 = D2 + G * L * A3
A1 = D1 + G * L * A2
A0 = D0 + G * L * A1
TOY_ADV = [A0, A1, A2, A3]
TOY_V = [0.5, 0.6, 0.7, 0.8]


def test_gae_on_a_4_step_trajectory_by_hand():
    mask = jnp.ones((1, 4), bool)
    rho = terminal_rewards(jnp.array([1.0]), mask)
    np.testing.assert_array_equal(rho, [[0, 0, 0, 1]])
    adv, ret = gae_advantages(rho, jnp.array([TOY_V]), mask, gamma=G, lam=L)
    np.testing.assert_allclose(adv, [TOY_ADV], rtol=1e-6)
    np.testing.assert_allclose(ret, [[a + v for a, v in zip(TOY_ADV, TOY_V)]], rtol=1e-6)


def test_gae_skips_masked_positions_in_ragged_rows():
    # row 0: the toy trajectory then right padding; row 1: the same behind a 2-token prompt prefix;
    # row 2: two tokens, V = (.5, 2), reward 3: δ1 = 3 - 2, δ0 = γ·2 - .5, A0 = δ0 + γλ·δ1; row 3: no token;
    # row 4: the toy trajectory with a masked hole (e.g. tool output) that the recursion steps over
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                      [1, 1, 0, 0, 1, 1]])
    values = jnp.array([TOY_V + [NAN, NAN], [NAN, NAN] + TOY_V, [0.5, 2.0] + [NAN] * 4, [NAN] * 6,
                        TOY_V[:2] + [5.0, NAN] + TOY_V[2:]])
    rho = terminal_rewards(jnp.array([1.0, 1.0, 3.0, 5.0, 1.0]), mask, per_token_BxT=jnp.zeros((5, 6)))
    np.testing.assert_array_equal(rho[3], 0.0)  # a row without tokens receives nothing
    adv, ret = gae_advantages(rho, values, mask, gamma=G, lam=L)
    d1, d0 = 3 - 2.0, G * 2.0 - 0.5
    expected = np.array([TOY_ADV + [0, 0], [0, 0] + TOY_ADV, [d0 + G * L * d1, d1, 0, 0, 0, 0], [0] * 6,
                         TOY_ADV[:2] + [0, 0] + TOY_ADV[2:]])
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ret[~np.asarray(mask, bool)], 0.0)
    assert bool(jnp.all(jnp.isfinite(ret)))


def test_gae_limits_and_per_token_rewards():
    # γ = λ = 1 with V = 0 is the return-to-go; λ = 0 is the one-step TD error
    mask = jnp.array([[1, 1, 1, 0]])
    rho = terminal_rewards(jnp.array([2.0]), mask, per_token_BxT=jnp.array([[-0.1, -0.2, -0.3, 9.0]]))
    np.testing.assert_allclose(rho, [[-0.1, -0.2, 2 - 0.3, 0]], rtol=1e-6)
    adv, _ = gae_advantages(rho, jnp.zeros((1, 4)), mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, reward_to_go(rho, mask), rtol=1e-6)
    np.testing.assert_allclose(adv, [[-0.1 - 0.2 + 1.7, -0.2 + 1.7, 1.7, 0]], rtol=1e-6)
    v = jnp.array([[0.3, 0.2, 0.1, 0.0]])
    adv, _ = gae_advantages(rho, v, mask, gamma=G, lam=0.0)
    np.testing.assert_allclose(adv, [[-0.1 + G * 0.2 - 0.3, -0.2 + G * 0.1 - 0.2, 1.7 - 0.1, 0]], rtol=1e-6)


V = jnp.array([[1.4, 0.5, 2.0, NAN]])
V_OLD = jnp.array([[0.8, 0.8, 0.8, NAN]])
RET = jnp.array([[1.5, 1.5, 0.0, NAN]])
VMASK = jnp.array([[1, 1, 1, 0]])


def test_value_loss_plain_and_clipped_by_hand():
    plain = value_loss_terms(V, V_OLD, RET, VMASK)
    np.testing.assert_allclose(plain, [[0.5 * 0.1**2, 0.5 * 1.0**2, 0.5 * 2.0**2, 0]], rtol=1e-5)
    # c = .2: clipped values (.8 + .2, .8 - .2, .8 + .2) = (1, .6, 1); (1-1.5)² = .25 > .01 wins on token 0 only
    clipped = value_loss_terms(V, V_OLD, RET, VMASK, clip=0.2)
    np.testing.assert_allclose(clipped, [[0.5 * 0.25, 0.5 * 1.0, 0.5 * 4.0, 0]], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(value_loss_terms(v, V_OLD, RET, VMASK, clip=0.2)))(V)
    np.testing.assert_allclose(g, [[0.0, 0.5 - 1.5, 2.0, 0]], rtol=1e-6)  # V - R, 0 on the clipped branch


def test_whiten_by_hand():
    # valid 1, 2, 3, 5: mean 2.75; population var (1.75² + .75² + .25² + 2.25²)/4 = 2.1875
    x = jnp.array([[1.0, 2, 3], [5, NAN, NAN]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    out = whiten(x, mask, eps=0.0)
    np.testing.assert_allclose(out, [[(1 - 2.75) / math.sqrt(2.1875), (2 - 2.75) / math.sqrt(2.1875),
                                      (3 - 2.75) / math.sqrt(2.1875)], [(5 - 2.75) / math.sqrt(2.1875), 0, 0]],
                               rtol=1e-6)
    # all-equal values (0.1 is inexact in float32) whiten to exactly 0, even with eps = 0
    np.testing.assert_array_equal(whiten(jnp.full((2, 3), 0.1), jnp.ones((2, 3)), eps=0.0), 0.0)


def test_ppo_advantages_whiten_but_returns_stay_raw():
    # γ = λ = 1, V = (0, .5), reward 1: δ = (.5, .5), A = (1, .5), R = A + V = (1, 1); whitened A = (1, -1)
    cfg = PPOConfig(gamma=1.0, lam=1.0)
    adv, ret = ppo_advantages(jnp.array([1.0]), jnp.array([[0.0, 0.5]]), jnp.ones((1, 2)), cfg)
    np.testing.assert_allclose(adv, [[(1 - 0.75) / 0.25, (0.5 - 0.75) / 0.25]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[1.0, 1.0]], rtol=1e-6)
    raw_cfg = PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False)
    raw, _ = ppo_advantages(jnp.array([1.0]), jnp.array([[0.0, 0.5]]), jnp.ones((1, 2)), raw_cfg)
    np.testing.assert_allclose(raw, [[1.0, 0.5]], rtol=1e-6)


def test_ppo_objective_by_hand():
    # ratio 1 (logp == old), A = (1, -.5, -, -): pg tokens (-1, .5); value tokens clipped (.125, .5, 2); token-mean
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5, 0.5]]))
    adv = jnp.array([[1.0, -0.5, 0.0, 0.0]])
    cfg = LossConfig(agg="token-mean", beta=0.0)
    num, den, stats = ppo_objective_parts(logp, logp, None, adv, V, V_OLD, RET, VMASK, cfg, PPOConfig(vf_coef=0.5))
    pg, vf = (-1 + 0.5 + 0) / 3, (0.125 + 0.5 + 2.0) / 3
    assert float(num / den) == pytest.approx(pg + 0.5 * vf, rel=1e-6)
    m = finalize_ppo_stats(stats)
    assert float(m["vf_loss"]) == pytest.approx(vf, rel=1e-6) and float(m["pg_loss"]) == pytest.approx(pg, rel=1e-6)


def test_ppo_micro_batches_sum_to_the_full_batch():
    rng = np.random.default_rng(0)
    B, T = 5, 4
    mask = jnp.asarray(np.arange(T)[None] < np.array([4, 2, 0, 3, 1])[:, None])
    logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (B, T))), jnp.float32)
    old, ref = logp + 0.1 * jnp.asarray(rng.normal(size=(B, T))), logp + 0.2
    values, old_v = jnp.asarray(rng.normal(size=(B, T))), jnp.asarray(rng.normal(size=(B, T)))
    adv, ret = ppo_advantages(jnp.asarray(rng.normal(size=B)), old_v, mask, PPOConfig(gamma=0.9, lam=0.8))
    cfgs = LossConfig(agg="seq-mean-token-mean", beta=0.05), PPOConfig()

    def parts(lp, v, *rest):  # (numerator, (denominator, stats)); gradients w.r.t. log-probs and values
        num, den, stats = ppo_objective_parts(lp, rest[0], rest[1], rest[2], v, *rest[3:], *cfgs)
        return num, (den, stats)

    grad = jax.jit(jax.value_and_grad(parts, argnums=(0, 1), has_aux=True))
    rows = lambda c: [x[c] for x in (logp, values, old, ref, adv, old_v, ret, mask)]  # noqa: E731
    (num, (den, stats)), (g_lp, g_v) = grad(*rows(slice(0, B)))
    chunks = [slice(0, 2), slice(2, 3), slice(3, 5)]  # uneven; the middle one is all padding
    outs = [grad(*rows(c)) for c in chunks]
    den_sum = sum(o[0][1][0] for o in outs)
    np.testing.assert_allclose(sum(o[0][0] for o in outs) / den_sum, num / den, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate([o[1][0] for o in outs]) / den_sum, g_lp / den, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate([o[1][1] for o in outs]) / den_sum, g_v / den, atol=1e-6)
    assert float(jnp.max(jnp.abs(g_v))) > 0  # the values really are trained
    merged = merge_stats(merge_stats(outs[0][0][1][1], outs[1][0][1][1]), outs[2][0][1][1])
    np.testing.assert_allclose(finalize_ppo_stats(merged)["vf_loss"], finalize_ppo_stats(stats)["vf_loss"], atol=1e-6)


def test_jit_bfloat16_and_errors():
    mask = jnp.array([[1, 1, 1, 0]])
    bf = jnp.array([[0.1, 0.2, 0.3, 0.4]], jnp.bfloat16)
    adv, ret = jax.jit(lambda r, v: gae_advantages(r, v, mask, gamma=0.9, lam=0.8))(bf, bf)
    assert adv.dtype == ret.dtype == jnp.float32
    eager = gae_advantages(bf.astype(jnp.float32), bf.astype(jnp.float32), mask, gamma=0.9, lam=0.8)[0]
    np.testing.assert_allclose(adv, eager, rtol=1e-6)
    assert value_loss_terms(bf, bf, bf, mask, clip=0.2).dtype == jnp.float32
    with pytest.raises(ValueError, match="lam must be in"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="value_clip must be > 0"):
        PPOConfig(value_clip=0.0)
    with pytest.raises(ValueError, match=r"values_BxT has shape \(1, 3\), expected \(1, 4\)"):
        gae_advantages(bf, bf[:, :3], mask, gamma=1.0, lam=1.0)
