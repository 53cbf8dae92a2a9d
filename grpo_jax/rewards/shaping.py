"""Batched reward shaping and filtering that act on whole rollout batches (pure JAX)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def overlong_penalty(lengths_B: jax.Array, max_len: int, buffer: int, factor: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), not floored.

        R_i = 0                                   if L_i <= max_len - buffer
        R_i = -(L_i - (max_len - buffer)) / buffer * factor   otherwise

    so R reaches -factor at L = max_len and keeps falling beyond it (the reference behaviour).
    """
    lengths_B = jnp.asarray(lengths_B)
    if lengths_B.ndim != 1:
        raise ValueError(f"overlong_penalty: lengths_B must be 1-D, got shape {lengths_B.shape}")
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must be in (0, max_len={max_len}], got {buffer}")
    start = max_len - buffer
    over = lengths_B.astype(jnp.float32) - start
    return jnp.where(over > 0, -over / buffer * factor, 0.0).astype(jnp.float32)


def _group_view(rewards_B: jax.Array, group_size: int, name: str) -> jax.Array:
    rewards_B = jnp.asarray(rewards_B)
    if rewards_B.ndim != 1 or group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(
            f"{name}: rewards_B must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {rewards_B.shape}"
        )
    return rewards_B.reshape(-1, group_size)


def zero_variance_mask(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """keep_B is True for samples whose group's rewards are not all equal (``train.mask_zero_variance``).

    Groups where every response got the same reward (all solved or all failed) have zero advantage and so carry
    no gradient; the mask also takes them out of the loss's denominators. This is not DAPO's dynamic sampling,
    which over-samples and refills the batch with groups that carry signal (``train.dynamic_sampling``,
    ``grpo_jax.sampling.refill``). Equality is exact (max == min), as in the advantages.
    """
    r_GxN = _group_view(rewards_B, group_size, "zero_variance_mask")
    keep_G = r_GxN.max(axis=1) != r_GxN.min(axis=1)
    return jnp.repeat(keep_G, group_size)


def zero_variance_fraction(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """Fraction of groups whose rewards are all equal (logged as a training signal-health metric)."""
    r_GxN = _group_view(rewards_B, group_size, "zero_variance_fraction")
    return jnp.mean((r_GxN.max(axis=1) == r_GxN.min(axis=1)).astype(jnp.float32))
