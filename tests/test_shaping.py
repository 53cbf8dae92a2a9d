import jax
import numpy as np
import pytest

from grpo_jax.rewards import overlong_penalty, zero_variance_fraction, zero_variance_mask


def test_overlong_penalty_hand_computed():
    # max_len 20, buffer 5: the penalty starts after 15 tokens, -(L-15)/5*factor, not floored past 20
    lengths = np.array([3, 15, 17, 20, 22])
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 5, 1.0), [0, 0, -0.4, -1.0, -1.4], rtol=1e-6)
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 5, 0.5), [0, 0, -0.2, -0.5, -0.7], rtol=1e-6)
    jitted = jax.jit(overlong_penalty, static_argnums=(1, 2, 3))(lengths, 20, 5, 1.0)
    assert jitted.dtype == np.float32 and jitted[2] == pytest.approx(-0.4)


def test_overlong_penalty_bad_input():
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(np.array([1]), 10, 0)
    with pytest.raises(ValueError, match="1-D"):
        overlong_penalty(np.ones((2, 2)), 10, 2)


def test_dynamic_sampling_keeps_only_mixed_groups():
    rewards = np.array([1, 1, 0, 1, 0.3, 0.3, 0.3, 0.3, 0, 0, 0, 0], np.float32)
    keep = zero_variance_mask(rewards, 4)
    assert keep.tolist() == [True] * 4 + [False] * 8
    assert float(zero_variance_fraction(rewards, 4)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="group_size=5"):
        zero_variance_mask(rewards, 5)
