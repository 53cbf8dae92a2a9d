"""Invariances of the core: micro-batch == full batch, padding changes nothing, jit/grad/bf16, sharded == 1 device."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import group_advantages, rloo_advantages
from grpo_jax.losses import (
    LossConfig,
    aggregate,
    finalize_objective_stats,
    grpo_objective,
    grpo_objective_parts,
    kl_penalty,
    merge_stats,
    policy_loss,
)
from grpo_jax.mesh import make_mesh, shard_batch

B, T = 8, 6
LENGTHS = np.array([6, 3, 0, 1, 5, 0, 2, 6])  # ragged, with two fully masked rows
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KINDS = ["grpo", "gspo", "cispo"]


def make_batch(seed=0, token_adv=False):
    rng = np.random.default_rng(seed)
    mask = np.arange(T)[None, :] < LENGTHS[:, None]
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    logp[~mask] = -np.inf  # padding may hold anything: it must not leak into values or gradients
    adv = rng.normal(0, 1, (B, T) if token_adv else (B,)).astype(np.float32)
    return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask)


def cfg_for(kind, mode):
    return LossConfig(
        kind=kind, agg=mode, beta=0.05, clip_low=1.0 if kind == "cispo" else 0.2, clip_high=0.28,
        norm_len=T if mode == "seq-mean-token-sum-norm" else None, dual_clip=None if kind == "cispo" else 3.0,
    )


@pytest.mark.parametrize("kind, mode", list(itertools.product(KINDS, MODES)))
def test_micro_batches_sum_to_the_full_batch(kind, mode):
    logp, old, ref, adv, mask = make_batch(token_adv=kind == "grpo")
    cfg = cfg_for(kind, mode)
    full_loss, full_grad = jax.value_and_grad(lambda lp: grpo_objective(lp, old, ref, adv, mask, cfg)[0])(logp)
    _, _, full_stats = grpo_objective_parts(logp, old, ref, adv, mask, cfg)

    chunks = [slice(0, 3), slice(3, 4), slice(4, 8)]  # uneven on purpose; one chunk is all padding
    parts = [grpo_objective_parts(logp[c], old[c], ref[c], adv[c], mask[c], cfg) for c in chunks]
    den = sum(p[1] for p in parts)
    loss = sum(p[0] for p in parts) / den
    grads = [
        jax.grad(lambda lp, c=c: grpo_objective_parts(lp, old[c], ref[c], adv[c], mask[c], cfg)[0])(logp[c]) / den
        for c in chunks
    ]
    np.testing.assert_allclose(loss, full_loss, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(grads), full_grad, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(full_grad)))
    np.testing.assert_array_equal(full_grad[~mask], 0.0)  # padding gets exactly zero gradient
    merged = parts[0][2]
    for p in parts[1:]:
        merged = merge_stats(merged, p[2])
    for k, v in finalize_objective_stats(full_stats).items():
        np.testing.assert_allclose(finalize_objective_stats(merged)[k], v, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("mode", MODES)
def test_padding_rows_and_columns_change_nothing(mode):
    logp, old, ref, adv, mask = make_batch()
    cfg = cfg_for("grpo", mode)
    loss = grpo_objective(logp, old, ref, adv, mask, cfg)[0]
    pad = lambda x, v: jnp.pad(x, ((0, 3), (0, 4)) if x.ndim == 2 else ((0, 3),), constant_values=v)  # noqa: E731
    padded = grpo_objective(pad(logp, -jnp.inf), pad(old, 0.0), pad(ref, jnp.nan), pad(adv, 5.0), pad(mask, False), cfg)
    np.testing.assert_allclose(padded[0], loss, atol=1e-7)
    g = jax.grad(
        lambda lp: grpo_objective(lp, pad(old, 0.0), pad(ref, jnp.nan), pad(adv, 5.0), pad(mask, False), cfg)[0]
    )(pad(logp, -jnp.inf))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_fully_masked_batch_gives_zero_loss_and_finite_grads():
    logp, old, ref, adv, _ = make_batch()
    mask = jnp.zeros((B, T), bool)
    for mode in MODES:
        loss, grad = jax.value_and_grad(
            lambda lp: grpo_objective(lp, old, ref, adv, mask, cfg_for("grpo", mode))[0])(logp)
        assert float(loss) == 0.0 and bool(jnp.all(grad == 0.0))


def test_jit_and_bfloat16_inputs_give_float32():
    logp, old, ref, adv, mask = make_batch()
    cfg = cfg_for("grpo", "seq-mean-token-mean")
    eager = grpo_objective(logp, old, ref, adv, mask, cfg)
    jitted = jax.jit(grpo_objective, static_argnums=5)(logp, old, ref, adv, mask, cfg)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    bf = [x.astype(jnp.bfloat16) for x in (logp, old, ref, adv)]
    up = [x.astype(jnp.float32) for x in bf]
    loss_bf, m_bf = jax.jit(grpo_objective, static_argnums=5)(*bf[:3], bf[3], mask, cfg)
    assert loss_bf.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m_bf.values())
    np.testing.assert_allclose(loss_bf, grpo_objective(*up[:3], up[3], mask, cfg)[0], rtol=1e-5)
    g = jax.grad(lambda lp: grpo_objective(lp, *bf[1:3], bf[3], mask, cfg)[0])(bf[0])
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))
    for fn in (lambda: kl_penalty(bf[0], bf[2]), lambda: aggregate(bf[0], mask, "token-mean")):
        assert jax.jit(fn)().dtype == jnp.float32
    assert jax.jit(lambda: policy_loss(*bf[:2], bf[3], mask)[0])().dtype == jnp.float32


def test_mismatched_shapes_and_unknown_names_raise():
    logp, old, ref, adv, mask = make_batch()
    with pytest.raises(ValueError, match=r"old_logp_BxT has shape \(8, 5\), expected \(8, 6\)"):
        policy_loss(logp, old[:, :5], adv, mask)
    with pytest.raises(ValueError, match=r"adv has shape \(7,\)"):
        policy_loss(logp, old, adv[:7], mask)
    with pytest.raises(ValueError, match=r"kind='ppo' is not supported; choose one of \['grpo', 'gspo', 'cispo'\]"):
        policy_loss(logp, old, adv, mask, kind="ppo")
    with pytest.raises(ValueError, match=r"mode='mean' is not supported"):
        aggregate(logp, mask, "mean")
    with pytest.raises(ValueError, match=r"kind='k4'"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match="floating-point"):
        kl_penalty(jnp.ones((2, 2), jnp.int32), ref[:2, :2])
    with pytest.raises(ValueError, match="2-D"):
        aggregate(logp, mask[0], "token-mean")


def test_sharded_core_matches_one_device():
    mesh = make_mesh(data=2, fsdp=4)
    rewards = jnp.asarray(np.random.default_rng(1).integers(0, 3, B).astype(np.float32) / 2)
    logp, old, ref, _, mask = make_batch()
    logp = jnp.where(mask, logp, 0.0)
    cfg = cfg_for("grpo", "seq-mean-token-mean")

    def step(rewards, logp, old, ref, mask):
        adv = group_advantages(rewards, 4) + rloo_advantages(rewards, 4)
        return jax.value_and_grad(lambda lp: grpo_objective(lp, old, ref, adv, mask, cfg)[0])(logp)

    single = jax.jit(step)(rewards, logp, old, ref, mask)
    sharded_args = shard_batch((rewards, logp, old, ref, mask), mesh)
    assert len({s.data.shape for s in sharded_args[1].addressable_shards}) == 1
    assert sharded_args[1].addressable_shards[0].data.shape == (1, T)  # really split over 8 devices
    sharded = jax.jit(step)(*sharded_args)
    np.testing.assert_allclose(sharded[0], single[0], atol=1e-6)
    np.testing.assert_allclose(sharded[1], single[1], atol=1e-6)
