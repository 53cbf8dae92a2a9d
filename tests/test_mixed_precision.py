"""Mixed precision: bfloat16 compute on float32 master weights. At lr 1e-6 an AdamW update moves each weight by
~1e-6, far below bfloat16's resolution (2^-8 relative: ~4e-4 for a weight of 0.1), so bfloat16-stored params
without a master copy do not move at all, and the config refuses them unless that is asked for explicitly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.algorithms import make_algorithm
from grpo_jax.config import ConfigError, from_dict
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.losses import LossConfig
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.train_step import StepConfig, init_train_state, make_train_step

from loop_helpers import tiny_experiment
from test_train_step import batch

STEPS = 3


def tiny(dtype: str):
    return ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, dtype=dtype, param_dtype=dtype)


def f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def weight_change(dtype: str, param_dtype: str, master: bool):
    """(change of the weights the optimizer updates, their start) after STEPS AdamW updates at lr 1e-6 on one batch,
    from the same float32 init stored in ``param_dtype``, computing in ``dtype``."""
    _, init = nnx.split(build_model(tiny("float32"), rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(build_model(tiny(dtype), rngs=nnx.Rngs(0)))
    # every run starts from the same values, exact in bfloat16
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(param_dtype), init)
    opt = make_optimizer(OptimConfig(lr=1e-6), STEPS)
    step = make_train_step(graphdef, opt, StepConfig(), make_algorithm("grpo", loss=LossConfig()))
    state = init_train_state(params, opt, master=master)
    start = f32(state.master if master else state.params)
    for _ in range(STEPS):
        state, metrics = step(state, batch())
        assert float(metrics["nonfinite"]) == 0.0
    if master:  # the params are the master copy's rounding; the moments are float32
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(state.params))
        assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(state.opt_state) if m.ndim)
        for m, p in zip(jax.tree.leaves(state.master), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(m.astype(jnp.bfloat16), np.float32), np.asarray(p, np.float32))
    end = f32(state.master if master else state.params)
    delta = np.concatenate([(e - s).ravel() for e, s in zip(jax.tree.leaves(end), jax.tree.leaves(start))])
    return delta, np.concatenate([s.ravel() for s in jax.tree.leaves(start)])


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_params_with_a_master_copy_update_as_float32_params_do():
    reference, _ = weight_change("float32", "float32", master=False)  # all float32
    assert np.abs(reference).max() == pytest.approx(STEPS * 1e-6, rel=0.05)  # AdamW: ~lr per step (float32 rounding)
    mixed, _ = weight_change("bfloat16", "float32", master=False)  # float32 params, bf16 compute (the TPU default)
    stored, _ = weight_change("bfloat16", "bfloat16", master=True)  # bf16 params with a float32 master copy
    assert relative(stored, mixed) < 1e-3  # measured 1.0e-5: the master copy moves exactly as float32 params do
    # against all-float32 both differ by the same ~7.5% (norm): bf16 compute's gradients, whose sign flips where
    # the float32 gradient is near 0 (AdamW moves every weight by ~lr whatever its gradient's size); the direction
    # is the same almost everywhere
    for x in (mixed, stored):
        assert relative(x, reference) < 0.15
        assert np.mean(np.sign(x) == np.sign(reference)) > 0.99
    # without a master copy the same updates round away: almost every bf16 weight stays exactly where it was
    lossy, start = weight_change("bfloat16", "bfloat16", master=False)
    moved = lossy != 0
    assert moved.mean() < 0.05 and relative(lossy, reference) > 0.9, (moved.mean(), relative(lossy, reference))
    assert np.all(np.abs(start[moved]) < 1e-3)  # only weights near 0, whose bf16 spacing is below 1e-6, move


def test_bf16_params_need_an_explicit_choice_of_master_weights():
    def experiment(**model):
        cfg = tiny_experiment()
        return from_dict(ExperimentConfig, cfg | {"model": cfg["model"] | model})

    with pytest.raises(ConfigError, match="model.param_dtype=bfloat16 .* set model.master_weights=true"):
        experiment(dtype="bfloat16", param_dtype="bfloat16")
    with pytest.raises(ConfigError, match="master_weights applies to param_dtype=bfloat16 only"):
        experiment(master_weights=True)
    assert experiment(param_dtype="bfloat16", master_weights=True).model.master_weights
    assert experiment(param_dtype="bfloat16", master_weights=False).model.master_weights is False


def test_frozen_reference_in_the_compute_dtype_gives_the_same_logprobs_at_half_the_bytes():
    """bfloat16 compute on float32 params: every use casts a param to bfloat16 first, so a reference stored in
    bfloat16 (``run_setup.frozen_copy``) gives bit-identical log-probs and holds half the bytes; with float32 compute
    it stays float32."""
    from grpo_jax.run_setup import frozen_copy, logprob_fn

    cfg = dataclasses.replace(tiny("float32"), dtype="bfloat16")
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    ref = frozen_copy(params, cfg.dtype)
    assert {x.dtype for x in jax.tree.leaves(ref)} == {jnp.dtype(jnp.bfloat16)}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert 2 * nbytes(ref) == nbytes(params)
    b = batch()
    logps = logprob_fn(graphdef, temperature=1.0, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(logps(ref, b.tokens_BxS, b.attn_mask_BxS)),
                                  np.asarray(logps(params, b.tokens_BxS, b.attn_mask_BxS)))
    kept = frozen_copy(params, "float32")
    assert all(k.dtype == jnp.float32 and k is not p for k, p in zip(jax.tree.leaves(kept), jax.tree.leaves(params)))
