"""Hand-computed expectations for the loss terms, the policy surrogates, the objective and every preset."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.losses import LossConfig, aggregate, aggregate_parts, grpo_objective, kl_penalty, policy_loss
from grpo_jax.presets import PRESETS

LN2 = math.log(2.0)


def test_kl_estimators_hand_computed():
    # logp = log .5, ref = log .25: d = ref - logp = -ln2
    logp, ref = jnp.log(jnp.array([[0.5]])), jnp.log(jnp.array([[0.25]]))
    assert float(kl_penalty(logp, ref, "k1")[0, 0]) == pytest.approx(LN2, rel=1e-6)  # logp - ref
    assert float(kl_penalty(logp, ref, "k2")[0, 0]) == pytest.approx(0.5 * LN2**2, rel=1e-6)
    assert float(kl_penalty(logp, ref, "k3")[0, 0]) == pytest.approx(0.5 + LN2 - 1, rel=1e-6)  # e^d - d - 1
    assert float(kl_penalty(ref, ref, "k3")[0, 0]) == 0.0


VALUES = jnp.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # ragged rows and one fully masked row


@pytest.mark.parametrize(
    "mode, expected, den",
    [
        ("token-mean", (1 + 2 + 4) / 3, 3),  # Σ v·m / Σ m
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2, 2),  # rows with tokens: 2
        ("seq-mean-token-sum", ((1 + 2) + 4) / 2, 2),
        ("seq-mean-token-sum-norm", (1 + 2 + 4) / (2 * 4), 8),  # norm_len 4
    ],
)
def test_aggregate_modes_hand_computed(mode, expected, den):
    num, d = aggregate_parts(VALUES, MASK, mode, norm_len=4)
    assert float(d) == den
    assert float(aggregate(VALUES, MASK, mode, norm_len=4)) == pytest.approx(expected, rel=1e-6)
    assert float(num / d) == pytest.approx(expected, rel=1e-6)


def test_aggregate_all_masked_is_zero_and_norm_len_required():
    assert float(aggregate(VALUES, jnp.zeros((3, 3)), "seq-mean-token-mean")) == 0.0
    with pytest.raises(ValueError, match="needs a positive norm_len"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


def _ratios(r_BxT):
    """(logp, old) with exp(logp - old) = r."""
    logp = jnp.log(jnp.full(np.shape(r_BxT), 0.5))
    return logp, logp - jnp.log(jnp.asarray(r_BxT))


def test_grpo_clip_cases_hand_computed():
    # (A=+1, r=1.5): -min(1.5, 1.2) = -1.2, clipped high | (A=+1, r=.5): -min(.5, .8) = -.5
    # (A=-1, r=.5): -min(-.5, -.8) = .8, clipped low    | (A=-1, r=1.5): -min(-1.5, -1.2) = 1.5
    logp, old = _ratios([[1.5, 0.5, 0.5, 1.5]])
    adv = jnp.array([[1.0, 1, -1, -1]])
    loss, m = policy_loss(logp, old, adv, jnp.ones((1, 4)), clip_low=0.2)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, rel=1e-6)
    assert (float(m["clip_frac"]), float(m["clip_frac_low"]), float(m["clip_frac_high"])) == (0.5, 0.25, 0.25)
    assert float(m["ratio_mean"]) == pytest.approx(1.0) and float(m["ratio_max"]) == pytest.approx(1.5)
    # clip-higher: the first token is now bounded at 1.28
    loss, _ = policy_loss(logp, old, adv, jnp.ones((1, 4)), clip_low=0.2, clip_high=0.28)
    assert float(loss) == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4, rel=1e-6)


def test_grpo_gradients_vanish_only_on_the_clipped_branch():
    logp, old = _ratios([[1.5, 0.5, 0.5, 1.5]])
    adv = jnp.array([[1.0, 1, -1, -1]])
    g = jax.grad(lambda lp: policy_loss(lp, old, adv, jnp.ones((1, 4)), agg="seq-mean-token-sum")[0])(logp)
    # d/dlogp of -r·A = -r·A where unclipped, 0 where clipped
    np.testing.assert_allclose(g, [[0.0, -0.5, 0.0, 1.5]], rtol=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
    # A=-1: r=5 gives 5, capped at c=3; r=2 gives 2 (< 3, untouched); A=+1 tokens are never capped
    logp, old = _ratios([[5.0, 2.0, 5.0]])
    adv = jnp.array([[-1.0, -1, 1]])
    loss, m = policy_loss(logp, old, adv, jnp.ones((1, 3)), dual_clip=3.0, agg="seq-mean-token-sum")
    assert float(loss) == pytest.approx(3 + 2 - 1.2, rel=1e-6)
    assert float(m["dual_clip"]) == pytest.approx(1 / 3)


def test_gspo_sequence_ratio_value_and_gradient():
    # log-ratios (.1, .3): s = exp(.2) = 1.2214 > 1.2. A=+1: each token -1.2 (clipped, zero gradient).
    # A=-1: each token s (unclipped side); d/dlogp_t = s/|o| = s/2 with seq-mean-token-mean.
    old = jnp.zeros((2, 2))
    logp = jnp.array([[0.1, 0.3], [0.1, 0.3]])
    adv = jnp.array([1.0, -1.0])
    s = math.exp(0.2)
    f = lambda lp: policy_loss(lp, old, adv, jnp.ones((2, 2)), kind="gspo", agg="seq-mean-token-mean")  # noqa: E731
    loss, m = f(logp)
    assert float(loss) == pytest.approx((-1.2 + s) / 2, abs=1e-6)  # a difference of O(1) float32 terms
    assert float(m["ratio_mean"]) == pytest.approx(s, rel=1e-6) and float(m["clip_frac"]) == 0.5
    g = jax.grad(lambda lp: f(lp)[0])(logp)
    np.testing.assert_allclose(g, [[0, 0], [s / 2 / 2, s / 2 / 2]], rtol=1e-5)  # outer 1/2: mean over 2 rows


def test_cispo_hand_computed():
    # r = .5/.25 = 2 -> weight clip(2, 0, 1.28) = 1.28 (sg); loss = -1.28 · A · logp = 1.28·ln2 for A=1
    logp, old = jnp.log(jnp.array([[0.5]])), jnp.log(jnp.array([[0.25]]))
    f = lambda lp: policy_loss(lp, old, jnp.array([1.0]), jnp.ones((1, 1)), kind="cispo", clip_low=1.0, clip_high=0.28)  # noqa: E731
    loss, m = f(logp)
    assert float(loss) == pytest.approx(1.28 * LN2, rel=1e-6) and float(m["clip_frac_high"]) == 1.0
    assert float(jax.grad(lambda lp: f(lp)[0])(logp)[0, 0]) == pytest.approx(-1.28, rel=1e-6)


def test_objective_adds_beta_kl_in_the_same_aggregation():
    # r = 1, A = 2: pg = -2; k3 with d = -ln2: .5 + ln2 - 1; β = .1
    logp = jnp.log(jnp.array([[0.5]]))
    ref = jnp.log(jnp.array([[0.25]]))
    cfg = LossConfig(beta=0.1, kl_kind="k3")
    loss, m = grpo_objective(logp, logp, ref, jnp.array([2.0]), jnp.ones((1, 1)), cfg)
    k3 = 0.5 + LN2 - 1
    assert float(loss) == pytest.approx(-2 + 0.1 * k3, rel=1e-6)
    assert float(m["kl"]) == pytest.approx(k3, rel=1e-6) and float(m["pg_loss"]) == pytest.approx(-2)
    with pytest.raises(ValueError, match="needs ref_logp_BxT"):
        grpo_objective(logp, logp, None, jnp.array([2.0]), jnp.ones((1, 1)), cfg)
    loss0, m0 = grpo_objective(logp, logp, None, jnp.array([2.0]), jnp.ones((1, 1)), LossConfig(beta=0.0))
    assert float(loss0) == pytest.approx(-2.0) and "kl" not in m0


# One batch for every preset. Tokens (row, t): (0,0) r=1.25 A=+1; (0,1) r=1.0 A=+1; (1,0) r=0.7 A=-1.
# logp = log(.5, .25 | .4); ref = logp + log(.5), so every token has k3 = .5 + ln2 - 1.
P_LOGP = jnp.log(jnp.array([[0.5, 0.25], [0.4, 0.9]]))
P_OLD = P_LOGP - jnp.log(jnp.array([[1.25, 1.0], [0.7, 1.0]]))
P_REF = P_LOGP + jnp.log(0.5)
P_MASK = jnp.array([[1, 1], [1, 0]])
P_ADV = jnp.array([1.0, -1.0])
K3 = 0.5 + LN2 - 1
S0 = math.sqrt(1.25)  # GSPO: exp(mean(log 1.25, log 1)) for row 0; row 1: 0.7
PRESET_LOSSES = {
    # seq-mean-token-mean, clip .2: row 0 (-1.2 - 1)/2, row 1 -min(-.7, -.8) = .8; + .04·k3 on every token
    "grpo": ((-1.2 - 1.0) / 2 + 0.8) / 2 + 0.04 * K3,
    # token sum / (B'·norm_len) with norm_len 4, no KL
    "dr_grpo": (-1.2 - 1.0 + 0.8) / (2 * 4),
    # token-mean, clip-higher 1.28 leaves r=1.25 unclipped
    "dapo": (-1.25 - 1.0 + 0.8) / 3,
    "bnpo": (-1.2 - 1.0 + 0.8) / 3 + 0.04 * K3,
    # sequence ratios S0 (A=+1, bound 1+4e-4) and .7 (A=-1, bound 1-3e-4), seq-mean
    "gspo": (-min(S0, 1 + 4e-4) + max(0.7, 1 - 3e-4)) / 2,
    # -sg(w)·A·logp, w = clip(r, 0, 1.28), token-mean
    "cispo": (-1.25 * math.log(0.5) - 1.0 * math.log(0.25) + 0.7 * math.log(0.4)) / 3,
}


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if PRESETS[n]().kind == "grpo"))
def test_every_preset_hand_computed(name):  # (ppo, dpo, hybrid: hand-computed in test_ppo, test_dpo, test_algos)
    cfg = PRESETS[name]().loss
    if cfg.agg == "seq-mean-token-sum-norm":
        cfg = dataclasses.replace(cfg, norm_len=4)
    loss, _ = grpo_objective(P_LOGP, P_OLD, P_REF, P_ADV, P_MASK, cfg)
    assert float(loss) == pytest.approx(PRESET_LOSSES[name], rel=1e-5, abs=1e-6)
