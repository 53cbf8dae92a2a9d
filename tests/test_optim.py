"""The optimizer builder by hand: which params weight decay reaches, the schedule's values, clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax.critic import ValueHead
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.optim import OptimConfig, decay_mask, make_optimizer, make_schedule


def tiny_params():
    """Every kind of param the models have: untied lm_head, q/k/v/o and MLP biases, Qwen3 q/k norms, a value head."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4, qkv_bias=True, o_bias=True, mlp_bias=True,
                      qk_norm=True, tie_word_embeddings=False)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    model.value_head = ValueHead(cfg.hidden_size)
    return nnx.split(model, nnx.Param)[1]


def by_name(tree) -> dict[str, object]:
    """{"model.layers.q": leaf, ...} over the dict keys of each leaf's path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): x for path, x in flat}


MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
DECAYED = {"lm_head", "model.embed", "value_head.w"} | {f"model.layers.{n}" for n in MATRICES}
NOT_DECAYED = ({"model.norm", "value_head.b"} | {f"model.layers.{n}_norm" for n in ("attn", "mlp", "q", "k")}
               | {f"model.layers.{n}_bias" for n in MATRICES})


def test_mask_decays_matrices_and_embeddings_not_norms_or_biases():
    mask = by_name(decay_mask(tiny_params()))
    assert set(mask) == DECAYED | NOT_DECAYED  # every param of the tiny model is named above
    assert {name for name, decayed in mask.items() if decayed} == DECAYED
    assert decay_mask({"w": jnp.ones(2)}) == {"w": True}  # a plain dict param is a weight


def test_weight_decay_reaches_only_the_masked_params():
    params = tiny_params()
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = by_name(jax.jit(opt.update)(zeros, opt.init(params), params)[0])
    values = by_name(params)
    # zero gradients: Adam's m̂/(√v̂+eps) = 0, so the update is -lr·wd·θ = -0.05·θ where decayed, exactly 0 elsewhere
    for name in DECAYED:
        np.testing.assert_allclose(updates[name], -0.05 * values[name], rtol=1e-6, err_msg=name)
    for name in NOT_DECAYED:
        assert not np.any(updates[name]), name


def test_schedule_values_by_hand():
    cosine = make_schedule(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2), 10)
    # warmup s/2: 0, 0.5; then ½(1 + cos(π(s-2)/8)): s=2 -> 1, s=4 -> ½(1 + cos(π/4)) = 0.853553, s=6 -> ½, s=10 -> 0
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0}
    for s, lr in expected.items():
        assert float(cosine(s)) == pytest.approx(lr, abs=1e-6), s
    constant = make_schedule(OptimConfig(lr=2.0, warmup_steps=4), 10)
    for s, lr in {0: 0.0, 1: 0.5, 2: 1.0, 4: 2.0, 100: 2.0}.items():  # warmup 2·s/4, then 2
        assert float(constant(s)) == pytest.approx(lr), s
    assert float(make_schedule(OptimConfig(lr=2.0), 10)(0)) == 2.0
    short = make_schedule(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=3), 2)  # decays at 4 = warmup + 1
    assert [float(short(s)) for s in (3, 4)] == [1.0, 0.0]


def test_updates_follow_the_schedule():
    # AdamW's first moments at update s are m̂ = g, v̂ = g², so the update is -lr(s)·sign(g) (eps = 1e-8 aside)
    opt = make_optimizer(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2, max_grad_norm=None), 10)
    params, grads = {"w": jnp.ones(2)}, {"w": jnp.array([3.0, -4.0])}
    state = opt.init(params)
    for lr in (0.0, 0.5, 1.0):  # s = 0, 1, 2 (same gradient each time: m̂ = g, v̂ = g² again)
        updates, state = opt.update(grads, state, params)
        # rtol: 1 - b2² = 0.001999 loses ~3e-5 of its relative precision in float32
        np.testing.assert_allclose(updates["w"], [-lr, lr], rtol=1e-4, atol=1e-7)


def test_clipping_scales_the_gradient_to_the_global_norm():
    # g = (3, 4, 12): ‖g‖ = 13; clipped to norm 6.5 -> g/2 = (1.5, 2, 6); Adam's first moment m = (1 - b1)·g = 0.1·g
    params, grads = {"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    for max_norm, seen in ((6.5, [1.5, 2.0, 6.0]), (13.5, [3.0, 4.0, 12.0]), (None, [3.0, 4.0, 12.0])):
        opt = make_optimizer(OptimConfig(lr=1.0, max_grad_norm=max_norm), 10)
        _, state = opt.update(grads, opt.init(params), params)
        mu = optax.tree.get(state, "mu")
        np.testing.assert_allclose(np.concatenate([mu["a"], mu["b"]]), 0.1 * np.array(seen), rtol=1e-6)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="schedule='linear'"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="lr must be > 0"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 or null"):
        OptimConfig(max_grad_norm=0.0)
