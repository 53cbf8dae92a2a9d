"""Off-policy correction (grpo_jax.losses.off_policy) and its hook in the GRPO objective: hand-computed weights,
masks, losses and gradients on a 2-sequence toy, mismatch metrics, padding, micro-batching, config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.config import ConfigError, from_dict
from grpo_jax.losses import (
    LossConfig,
    OffPolicyConfig,
    correction_terms,
    finalize_mismatch_stats,
    finalize_objective_stats,
    grpo_objective,
    grpo_objective_parts,
    merge_stats,
    mismatch_stats,
    policy_loss_terms,
)

LN = math.log
# The toy: row 0 has 3 tokens, row 1 has 2 (its last position is padding). d = log π_prox - log μ per token, so
# the token ratios are ρ = exp(d) = [3, 1, 0.5] and [1.5, 0.25].
D = np.array([[LN(3.0), 0.0, LN(0.5)], [LN(1.5), LN(0.25), 0.0]], np.float32)
MASK = np.array([[True, True, True], [True, True, False]])
OLD = np.array([[-1.0, -0.5, -2.0], [-0.7, -1.2, -0.3]], np.float32)  # π_prox: the trainer's log-probs
BEHAV = OLD - D  # μ: the sampler's log-probs
ADV = np.array([1.0, -0.5], np.float32)


def close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float32), atol=atol, rtol=1e-5)


def objective(off, agg, logp=OLD):
    """(loss, metrics, dL/dlogp) of the toy with logp = π_θ (default π_θ = π_prox, every ratio r = 1, unclipped)."""
    cfg = LossConfig(agg=agg, beta=0.0, clip_low=0.2, off_policy=off)
    f = lambda lp: grpo_objective(lp, OLD, None, ADV, MASK, cfg, behav_logp_BxT=BEHAV)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    return loss, metrics, grad


def check_counts(stats, weight_sum, truncated, masked):
    """truncated/masked: (tokens, rows); the toy has 5 tokens in 2 rows."""
    close(stats["mismatch/tokens"], 5.0)
    close(stats["mismatch/seqs"], 2.0)
    close(stats["mismatch/weight_sum"], weight_sum)
    close([stats["mismatch/truncated_tokens_sum"], stats["mismatch/truncated_seqs_sum"]], truncated)
    close([stats["mismatch/masked_tokens_sum"], stats["mismatch/masked_seqs_sum"]], masked)


def test_token_tis():
    off = OffPolicyConfig(weight="truncate", level="token", cap=2.0)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    close(w, [[2.0, 1.0, 0.5], [1.5, 0.25, 0.0]])  # min(ρ, 2): only ρ = 3 is capped
    np.testing.assert_array_equal(keep, MASK)
    check_counts(stats, 2 + 1 + 0.5 + 1.5 + 0.25, truncated=(1, 1), masked=(0, 0))
    # token-mean, r = 1: ℓ = -A·w = [-2, -1, -0.5] and +0.5·[1.5, 0.25] = [0.75, 0.125]
    # L = (-3.5 + 0.875) / 5 = -0.525;  dL/dlogp = -A·w·r / 5
    loss, metrics, grad = objective(off, "token-mean")
    close(loss, -0.525)
    cfg = LossConfig(agg="token-mean", beta=0.0, off_policy=off)
    close(jax.jit(lambda lp, b: grpo_objective(lp, OLD, None, ADV, MASK, cfg, behav_logp_BxT=b)[0])(OLD, BEHAV), -0.525)
    close(grad, [[-0.4, -0.2, -0.1], [0.15, 0.025, 0.0]])
    close(metrics["mismatch/truncated_token_frac"], 1 / 5)
    close(metrics["mismatch/truncated_seq_frac"], 1 / 2)
    close(metrics["mismatch/weight_mean"], 5.25 / 5)


def test_sequence_tis():
    off = OffPolicyConfig(weight="truncate", level="sequence", cap=1.2)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    # ρ_0 = 3·1·0.5 = 1.5 -> min(1.5, 1.2) = 1.2;  ρ_1 = 1.5·0.25 = 0.375 (below the cap)
    close(w, [[1.2, 1.2, 1.2], [0.375, 0.375, 0.0]])
    np.testing.assert_array_equal(keep, MASK)
    check_counts(stats, 3 * 1.2 + 2 * 0.375, truncated=(3, 1), masked=(0, 0))
    # seq-mean-token-mean: row means -1.2 and +0.5·0.375 = 0.1875; L = (-1.2 + 0.1875) / 2 = -0.50625
    # dL/dlogp_it = -A_i·w_i / (|o_i|·2): row 0 -1.2/6 = -0.2, row 1 0.1875/4 = 0.046875
    loss, _, grad = objective(off, "seq-mean-token-mean")
    close(loss, -0.50625)
    close(grad, [[-0.2, -0.2, -0.2], [0.046875, 0.046875, 0.0]])


def test_geometric_tis():
    off = OffPolicyConfig(weight="truncate", level="geometric", cap=1.1)
    w, _, stats = correction_terms(OLD, BEHAV, MASK, off)
    # ρ_0 = 1.5^(1/3) = 1.144714 -> 1.1 (capped);  ρ_1 = 0.375^(1/2) = 0.612372
    g1 = 0.375 ** 0.5
    close(w, [[1.1, 1.1, 1.1], [g1, g1, 0.0]])
    check_counts(stats, 3.3 + 2 * g1, truncated=(3, 1), masked=(0, 0))
    # token-mean: Σℓ = -1·1.1·3 + 0.5·0.612372·2 = -3.3 + 0.612372 = -2.687628; L = -2.687628 / 5 = -0.5375256
    loss, _, grad = objective(off, "token-mean")
    close(loss, (-3.3 + g1) / 5)
    close(grad, [[-0.22, -0.22, -0.22], [0.5 * g1 / 5, 0.5 * g1 / 5, 0.0]])


def test_token_mask_keeps_the_original_denominator():
    off = OffPolicyConfig(weight="none", reject="mask", level="token", reject_low=0.4, reject_high=2.0)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    # keep 0.4 <= ρ <= 2: ρ = 3 and ρ = 0.25 are rejected
    np.testing.assert_array_equal(keep, [[False, True, True], [True, False, False]])
    close(w, [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    check_counts(stats, 3.0, truncated=(0, 0), masked=(2, 2))
    # seq-mean-token-mean over the ORIGINAL lengths 3 and 2: row 0 (0 - 1 - 1)/3 = -2/3, row 1 (0.5 + 0)/2 = 0.25
    # L = (-2/3 + 0.25) / 2 = -0.2083333;  grad row 0: -1/(3·2) = -1/6, row 1: 0.5/(2·2) = 0.125
    loss, metrics, grad = objective(off, "seq-mean-token-mean")
    close(loss, (-2 / 3 + 0.25) / 2)
    close(grad, [[0.0, -1 / 6, -1 / 6], [0.125, 0.0, 0.0]])
    close(metrics["mismatch/masked_token_frac"], 2 / 5)
    close(metrics["mismatch/masked_seq_frac"], 1.0)


def test_sequence_mask_drops_whole_rows():
    off = OffPolicyConfig(weight="none", reject="mask", level="sequence", reject_low=0.5, reject_high=2.0)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    # ρ_0 = 1.5 is kept, ρ_1 = 0.375 < 0.5 drops row 1
    np.testing.assert_array_equal(keep, [[True, True, True], [False, False, False]])
    close(w, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    check_counts(stats, 3.0, truncated=(0, 0), masked=(2, 1))
    # seq-mean-token-mean, still 2 rows in the denominator: L = (-1 + 0) / 2 = -0.5; grad row 0: -1/6
    loss, _, grad = objective(off, "seq-mean-token-mean")
    close(loss, -0.5)
    close(grad, [[-1 / 6, -1 / 6, -1 / 6], [0.0, 0.0, 0.0]])


def test_token_tis_with_rejection():
    off = OffPolicyConfig(weight="truncate", cap=1.2, reject="mask", reject_low=0.3, reject_high=2.5)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    # ρ = [3, 1, 0.5], [1.5, 0.25]: 3 > 2.5 and 0.25 < 0.3 rejected; the rest min(ρ, 1.2) = [1, 0.5], [1.2]
    close(w, [[0.0, 1.0, 0.5], [1.2, 0.0, 0.0]])
    np.testing.assert_array_equal(keep, [[False, True, True], [True, False, False]])
    check_counts(stats, 2.7, truncated=(2, 2), masked=(2, 2))  # ρ = 3 and 1.5 exceed the cap


def test_decoupled_weights_and_clip_against_the_proximal_policy():
    off = OffPolicyConfig(weight="decoupled", cap=2.0)
    w, keep, stats = correction_terms(OLD, BEHAV, MASK, off)
    # AReaL: w = π_prox/μ = ρ, and tokens with ρ > 2 dropped (ρ = 3)
    close(w, [[0.0, 1.0, 0.5], [1.5, 0.25, 0.0]])
    np.testing.assert_array_equal(keep, [[False, True, True], [True, True, False]])
    check_counts(stats, 3.25, truncated=(0, 0), masked=(1, 1))
    # π_θ moves on token (0, 2): r = π_θ/π_prox = 1.5 > 1 + 0.2 with A = 1 > 0 -> clipped: ℓ = -1.2·1·w = -0.6,
    # no gradient. (Against μ the ratio would be 1.5·0.5 = 0.75, unclipped: the anchor is π_prox.)
    logp = OLD.copy()
    logp[0, 2] += LN(1.5)
    # token-mean: Σℓ = 0 (dropped) - 1·1 - 0.6 + 0.5·1.5 + 0.5·0.25 = -0.725;  L = -0.145
    # grad = -A·w·r / 5: [0, -0.2, 0 (clipped)], [0.15, 0.025, 0]
    loss, metrics, grad = objective(off, "token-mean", logp)
    close(loss, -0.145)
    close(grad, [[0.0, -0.2, 0.0], [0.15, 0.025, 0.0]])
    close(metrics["clip_frac_high"], 1 / 5)
    close(metrics["mismatch/masked_token_frac"], 1 / 5)


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(OLD, BEHAV, MASK, OffPolicyConfig(weight="truncate", cap=2.0))
    # |d| = ln3 + 0 + ln2 + ln1.5 + ln4 = ln 36 = 3.583519
    close(stats["mismatch/abs_logp_diff_sum"], LN(36.0))
    # k3 = r - 1 - ln r: (2 - ln3) + 0 + (-0.5 + ln2) + (0.5 - ln1.5) + (-0.75 + ln4) = 1.825364
    k3 = (2 - LN(3)) + (-0.5 + LN(2)) + (0.5 - LN(1.5)) + (-0.75 + LN(4))
    close(stats["mismatch/kl_k3_sum"], k3)
    close([stats["mismatch/ratio_max"], stats["mismatch/ratio_min"]], [3.0, 0.25])
    out = finalize_mismatch_stats(stats)
    close(out["mismatch/abs_logp_diff"], LN(36.0) / 5)  # 0.716704
    close(out["mismatch/kl_k3"], k3 / 5)  # 0.365073
    close([out["mismatch/ratio_max"], out["mismatch/ratio_min"]], [3.0, 0.25])
    close([out["mismatch/truncated_token_frac"], out["mismatch/truncated_seq_frac"]], [1 / 5, 1 / 2])
    close([out["mismatch/masked_token_frac"], out["mismatch/masked_seq_frac"]], [0.0, 0.0])
    assert set(finalize_mismatch_stats(mismatch_stats(OLD, BEHAV, MASK))) == {
        "mismatch/abs_logp_diff", "mismatch/kl_k3", "mismatch/ratio_max", "mismatch/ratio_min"}


CONFIGS = [
    OffPolicyConfig(weight="truncate", level="token"),
    OffPolicyConfig(weight="truncate", level="sequence", cap=1.5),
    OffPolicyConfig(weight="truncate", level="geometric", cap=1.1, reject="mask", reject_low=0.9, reject_high=1.1),
    OffPolicyConfig(weight="none", level="token", reject="mask"),
    OffPolicyConfig(weight="none", level="sequence", reject="mask"),
    OffPolicyConfig(weight="decoupled", cap=1.2),
]


@pytest.mark.parametrize("off", CONFIGS)
def test_fully_masked_rows_and_long_rows_stay_finite(off):
    n = 1000
    mask = np.zeros((3, n), bool)
    mask[1] = True  # row 0: no valid token; row 1: 1000 tokens with d = 1 (sequence ρ = e^1000); row 2: 3 tokens
    mask[2, :3] = True
    old = np.where(mask, -1.0, np.nan).astype(np.float32)
    behav = np.where(mask, -2.0, -np.inf).astype(np.float32)
    logp = np.where(mask, -1.0, -np.inf).astype(np.float32)
    w, keep, stats = correction_terms(old, behav, mask, off)
    assert bool(jnp.all(jnp.isfinite(w))) and all(bool(jnp.isfinite(v)) for v in stats.values())
    np.testing.assert_array_equal(w[0], 0.0)
    assert not bool(keep[0].any())
    cfg = LossConfig(beta=0.0, off_policy=off)
    f = lambda lp: grpo_objective(lp, old, None, np.ones(3, np.float32), mask, cfg, behav_logp_BxT=behav)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))
    assert all(bool(jnp.isfinite(v)) for v in metrics.values()), metrics
    np.testing.assert_array_equal(grad[~mask], 0.0)
    empty = grpo_objective(logp[:1], old[:1], None, np.ones(1, np.float32), mask[:1], cfg, behav_logp_BxT=behav[:1])
    assert float(empty[0]) == 0.0 and all(float(v) == 0.0 for v in empty[1].values())


@pytest.mark.parametrize("off, kind, agg", [
    (CONFIGS[0], "grpo", "token-mean"), (CONFIGS[1], "gspo", "seq-mean-token-mean"),
    (CONFIGS[2], "grpo", "seq-mean-token-sum"), (CONFIGS[3], "cispo", "token-mean"),
    (CONFIGS[4], "grpo", "seq-mean-token-mean"), (CONFIGS[5], "grpo", "token-mean"),
])
def test_strided_micro_batches_sum_to_the_full_batch(off, kind, agg):
    rng = np.random.default_rng(0)
    mask = np.arange(6)[None, :] < np.array([6, 3, 0, 1, 5, 0, 2, 6])[:, None]
    old = np.log(rng.uniform(0.05, 0.95, (8, 6))).astype(np.float32)
    behav = (old + rng.normal(0, 0.3, (8, 6))).astype(np.float32)
    logp = (old + rng.normal(0, 0.2, (8, 6))).astype(np.float32)
    adv = rng.normal(0, 1, 8).astype(np.float32)
    cfg = LossConfig(kind=kind, agg=agg, beta=0.0, clip_low=1.0 if kind == "cispo" else 0.2, off_policy=off)

    def parts(rows):
        f = lambda lp: grpo_objective_parts(lp, old[rows], None, adv[rows], mask[rows], cfg,  # noqa: E731
                                            behav_logp_BxT=behav[rows])
        return *f(logp[rows]), jax.grad(lambda lp: f(lp)[0])(jnp.asarray(logp[rows]))

    num, den, stats, g = parts(slice(None))
    halves = [parts(slice(k, None, 2)) for k in (0, 1)]  # micro-batch k = rows k, k+2, k+4, ...
    den_mb = halves[0][1] + halves[1][1]
    close(den_mb, den)
    close((halves[0][0] + halves[1][0]) / den_mb, num / den)
    grad_mb = np.zeros((8, 6), np.float32)
    grad_mb[0::2], grad_mb[1::2] = halves[0][3], halves[1][3]
    close(grad_mb / den_mb, g / den)
    merged, full = finalize_objective_stats(merge_stats(halves[0][2], halves[1][2])), finalize_objective_stats(stats)
    assert any(k.startswith("mismatch/") for k in full)
    for k, v in full.items():
        close(merged[k], v)


def test_off_policy_none_is_bit_identical():
    cfg = LossConfig(agg="token-mean", beta=0.1)
    ref = OLD - 0.3
    f = lambda lp, **kw: grpo_objective(lp, OLD, ref, ADV, MASK, cfg, **kw)  # noqa: E731
    base = jax.value_and_grad(f, has_aux=True)(OLD + 0.1)
    with_behav = jax.value_and_grad(lambda lp: f(lp, behav_logp_BxT=BEHAV), has_aux=True)(OLD + 0.1)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base, with_behav))
    plain = policy_loss_terms(OLD + 0.1, OLD, ADV, MASK)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), plain,
                                     policy_loss_terms(OLD + 0.1, OLD, ADV, MASK, weight_BxT=None)))
    # monitoring only (no weight, no rejection): the same loss and gradient, bit for bit, plus mismatch/* metrics
    monitor = LossConfig(agg="token-mean", beta=0.1, off_policy=OffPolicyConfig(weight="none"))
    g = lambda lp: grpo_objective(lp, OLD, ref, ADV, MASK, monitor, behav_logp_BxT=BEHAV)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(g, has_aux=True)(OLD + 0.1)
    assert bool(jnp.array_equal(loss, base[0][0])) and bool(jnp.array_equal(grad, base[1]))
    assert {k: v for k, v in metrics.items() if not k.startswith("mismatch/")}.keys() == base[0][1].keys()


@pytest.mark.parametrize("kwargs, field", [
    (dict(weight="clip"), "weight"), (dict(level="row"), "level"), (dict(reject="drop"), "reject"),
    (dict(cap=0.5), "cap"), (dict(cap=float("nan")), "cap"), (dict(reject_low=1.0), "reject_low"),
    (dict(reject_low=-0.1), "reject_low"), (dict(reject_high=1.0), "reject_high"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        OffPolicyConfig(**kwargs)


def test_loss_config_checks_and_yaml_shape():
    with pytest.raises(ValueError, match="off_policy"):
        LossConfig(off_policy="tis")
    cfg = LossConfig(beta=0.0, off_policy=OffPolicyConfig())
    with pytest.raises(ValueError, match="behav_logp_BxT"):
        grpo_objective(OLD, OLD, None, ADV, MASK, cfg)
    parsed = from_dict(LossConfig, {"off_policy": {"weight": "decoupled", "cap": 3.0}})
    assert parsed.off_policy == OffPolicyConfig(weight="decoupled", cap=3.0)
    with pytest.raises(ConfigError, match="level"):
        from_dict(LossConfig, {"off_policy": {"level": "row"}})
