"""The jitted update: exact micro-batch accumulation, μ iterations, refusal of non-finite updates."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax.advantages import kl_reward_advantages
from grpo_jax.algorithms import make_algorithm
from grpo_jax.losses import LossConfig
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step

B, S = 8, 12


def tiny():
    cfg = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    return nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))


def batch(seed=0, token_adv=False):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, 5, B)
    comp_len = np.array([6, 3, 0, 1, 7, 2, 5, 4])  # one row has no completion token at all
    pos = np.arange(S)[None]
    start = 5 - prompt_len[:, None]
    attn = (pos >= start) & (pos < 5 + comp_len[:, None])
    loss_mask = (pos >= 5) & (pos < 5 + comp_len[:, None])
    tokens = np.where(attn, rng.integers(3, 64, (B, S)), 0).astype(np.int32)
    old = np.where(loss_mask, np.log(rng.uniform(0.01, 0.2, (B, S))), 0).astype(np.float32)
    ref = np.where(loss_mask, old + rng.normal(0, 0.1, (B, S)), 0).astype(np.float32)
    adv = rng.normal(0, 1, (B, S) if token_adv else B).astype(np.float32)
    return Batch(tokens_BxS=jnp.asarray(tokens), attn_mask_BxS=jnp.asarray(attn), loss_mask_BxS=jnp.asarray(loss_mask),
                 old_logp_BxS=jnp.asarray(old), ref_logp_BxS=jnp.asarray(ref), adv=jnp.asarray(adv))


def run(step_cfg, b, optim=None, loss=None):
    graphdef, params = tiny()
    # plain SGD with lr 1: the param change is exactly -grad, so updates compare gradients
    opt = optim or optax.sgd(1.0)
    step = make_train_step(graphdef, opt, step_cfg, make_algorithm("grpo", loss=loss or LossConfig()))
    state, metrics = step(init_train_state(params, opt), b)
    delta = jax.tree.map(lambda a, c: a - c, state.params, params)
    return state, metrics, delta


@pytest.mark.parametrize(
    "agg, num_iterations", [("token-mean", 1), ("seq-mean-token-mean", 2), ("seq-mean-token-sum-norm", 1)]
)
def test_micro_batches_give_the_full_batch_update(agg, num_iterations):
    loss = LossConfig(agg=agg, beta=0.04, norm_len=8.0 if agg.endswith("norm") else None)
    b = batch(token_adv=agg == "token-mean")
    cfg = StepConfig(num_iterations=num_iterations, micro_batches=1)
    _, m_full, d_full = run(cfg, b, loss=loss)
    _, m_micro, d_micro = run(dataclasses.replace(cfg, micro_batches=4), b, loss=loss)
    for a, c in zip(jax.tree.leaves(d_full), jax.tree.leaves(d_micro)):
        np.testing.assert_allclose(a, c, atol=2e-6)
    for k in ("loss", "kl", "clip_frac", "entropy", "grad_norm"):
        np.testing.assert_allclose(m_micro[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(jnp.abs(jnp.concatenate([x.ravel() for x in jax.tree.leaves(d_full)])).max()) > 0


def test_on_policy_first_ratio_is_exactly_one():
    _, m, _ = run(StepConfig(), batch(), loss=LossConfig(beta=0.0))
    assert float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0


def test_non_finite_update_is_refused():
    b = batch()
    b = b.replace(adv=b.adv.at[0].set(jnp.nan))
    graphdef, params = tiny()
    opt = make_optimizer(OptimConfig(lr=1e-3), 10)
    state0 = init_train_state(params, opt)
    before = jax.tree.map(np.asarray, state0)  # the step donates its input state
    state, m = make_train_step(graphdef, opt, StepConfig(), make_algorithm("grpo"))(state0, b)
    assert float(m["nonfinite"]) == 1.0
    for a, c in zip(jax.tree.leaves(state), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, c)


def test_kl_in_reward_advantage_hand_computed():
    # k1 per token (.1, .2, .3) on 3 valid tokens; A_t = A - β·Σ_{t'≥t} k1 with β = .5: 1 - .3, 1 - .25, 1 - .15
    logp = jnp.array([[0.1, 0.2, 0.3, 9.0]])
    adv = kl_reward_advantages(jnp.array([1.0]), logp, jnp.zeros((1, 4)), jnp.array([[1, 1, 1, 0]]), 0.5)
    np.testing.assert_allclose(adv, [[0.7, 0.75, 0.85, 0.0]], rtol=1e-6)


def test_reference_logprobs_per_micro_batch_equal_the_whole_batch():
    from grpo_jax.run_setup import logprob_fn

    graphdef, params = tiny()
    b = batch()
    whole = logprob_fn(graphdef, 1.0, 128)(params, b.tokens_BxS, b.attn_mask_BxS)
    for m in (2, 4):
        per_micro = logprob_fn(graphdef, 1.0, 128, micro_batches=m)(params, b.tokens_BxS, b.attn_mask_BxS)
        np.testing.assert_allclose(np.asarray(per_micro), np.asarray(whole), atol=1e-6)


def test_optimizer_moments_are_sharded_like_their_params():
    from grpo_jax.mesh import make_mesh, shard_model
    from grpo_jax.models import ModelConfig, build_model

    mesh = make_mesh(1, 4, 2)  # fsdp 4 x tensor 2 over the 8 test devices
    model = shard_model(build_model(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8),
                                    rngs=nnx.Rngs(0)), mesh)
    _, params = nnx.split(model)
    opt = make_optimizer(OptimConfig(weight_decay=0.1), 10)
    state = init_train_state(params, opt)
    specs = [x.sharding.spec for x in jax.tree.leaves(params)]
    assert any(s != jax.sharding.PartitionSpec() for s in specs)  # the params really are sharded
    adam = [s for s in jax.tree.leaves(state.opt_state) if s.ndim > 0]
    assert len(adam) == 2 * len(specs)  # mu and nu of every param
    assert [x.sharding.spec for x in adam] == specs + specs
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
