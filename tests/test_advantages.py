import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import AdvantageConfig, compute_advantages, group_advantages, rloo_advantages


def test_group_scale_hand_computed():
    # mean 0.25; centred (.75, -.25, -.25, -.25); unbiased var = (.5625 + 3*.0625)/3 = .25 -> std .5
    adv = group_advantages(jnp.array([1.0, 0, 0, 0]), 4, scale="group", eps=0.0)
    np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5], rtol=1e-6)
    # eps enters as std + eps: .75 / (.5 + .25) = 1
    np.testing.assert_allclose(group_advantages(jnp.array([1.0, 0, 0, 0]), 4, eps=0.25)[0], 1.0, rtol=1e-6)


def test_batch_scale_hand_computed():
    # groups (1,0) and (1,1); numerators (.5,-.5,0,0); batch std of (1,0,1,1): mean .75, var .75/3 = .25 -> .5
    adv = group_advantages(jnp.array([1.0, 0, 1, 1]), 2, scale="batch", eps=0.0)
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0], rtol=1e-6)


def test_no_scale_is_dr_grpo():
    np.testing.assert_allclose(group_advantages(jnp.array([3.0, 1, 5, 5]), 2, scale="none"), [1, -1, 0, 0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_groups_are_exactly_zero(scale):
    rewards = jnp.array([0.1] * 3 + [0.7] * 3 + [1 / 3] * 3 + [0.0, 1.0, 0.3], jnp.float32)
    adv = np.asarray(group_advantages(rewards, 3, scale=scale))
    assert np.all(adv[:9] == 0.0)
    assert np.all(np.abs(adv[9:]) > 0.1) and np.all(np.isfinite(adv))
    assert np.all(np.asarray(rloo_advantages(rewards, 3))[:9] == 0.0)


def test_ragged_groups_with_padding():
    # group 0: (1, 0) mean .5, var .5 -> std .7071; group 1: (2, 4, 0) mean 2, var (0+4+4)/2 = 4 -> std 2; id -1 pads
    rewards = jnp.array([1.0, 0, 2, 4, 0, 9])
    ids = jnp.array([0, 0, 1, 1, 1, -1])
    adv = group_advantages(rewards, None, group_ids_B=ids, num_groups=2, eps=0.0)
    np.testing.assert_allclose(adv, [0.5 / np.sqrt(0.5), -0.5 / np.sqrt(0.5), 0, 1, -1, 0], rtol=1e-6)
    # batch std over the 5 valid rewards only: mean 1.4, squares .16+1.96+.36+6.76+1.96 = 11.2, /4 = 2.8
    adv = group_advantages(rewards, None, scale="batch", group_ids_B=ids, num_groups=2, eps=0.0)
    np.testing.assert_allclose(adv, np.array([0.5, -0.5, 0, 2, -2, 0]) / np.sqrt(2.8), rtol=1e-6)
    np.testing.assert_allclose(rloo_advantages(rewards, None, group_ids_B=ids, num_groups=2), [1, -1, 0, 3, -3, 0])


def test_rloo_hand_computed():
    # A_0 = 1 - (0+0+0)/3 = 1; A_1 = 0 - (1+0+0)/3 = -1/3
    np.testing.assert_allclose(rloo_advantages(jnp.array([1.0, 0, 0, 0]), 4), [1, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    cfg = AdvantageConfig(estimator="rloo", scale="none")
    np.testing.assert_allclose(compute_advantages(jnp.array([2.0, 0]), 2, cfg), [2, -2])


def test_jit_grad_and_bfloat16():
    rewards = jnp.array([1.0, 0.5, 0.0, 1, 1, 1], jnp.bfloat16)
    for fn in (
        jax.jit(group_advantages, static_argnums=1, static_argnames=("scale",)),
        jax.jit(rloo_advantages, static_argnums=1),
    ):
        adv = fn(rewards, 3)
        assert adv.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(adv)))
    grad = jax.grad(lambda r: jnp.sum(group_advantages(r, 3) ** 2))(rewards.astype(jnp.float32))
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(grad[3:], 0.0)  # the constant group passes no gradient


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible into groups of group_size=4"):
        group_advantages(jnp.ones(6), 4)
    with pytest.raises(ValueError, match=r"must be 1-D"):
        group_advantages(jnp.ones((2, 3)), 3)
    with pytest.raises(ValueError, match=r"scale='std'; choose one of \['group', 'batch', 'none'\]"):
        group_advantages(jnp.ones(4), 2, scale="std")
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(jnp.ones(4), None, group_ids_B=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="numeric"):
        group_advantages(jnp.ones(4, bool), 2)
