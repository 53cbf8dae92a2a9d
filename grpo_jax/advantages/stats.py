"""Statistics that rewards and token terms are centred and scaled by (pure JAX): masked per-segment moments,
running moments with exponential forgetting, and masked whitening.

Exactness rule shared with ``grpo_jax.advantages.group``: when every valid value of a segment is exactly equal
(max == min), its mean is that value exactly and its spread is exactly 0, so a centred value is exactly 0 rather
than float32 rounding noise (the mean of (0.1, 0.1, 0.1) computed as sum/3 need not equal 0.1).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _f32(name: str, x, ndim: int) -> jax.Array:
    """``x`` as float32 after checking its rank and that it is numeric (this module imports nothing of the
    package, so every other module can use it)."""
    x = jnp.asarray(x)
    if x.ndim != ndim or not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a {ndim}-D numeric array, got shape {x.shape} dtype {x.dtype}")
    return x.astype(jnp.float32)


def segment_ids(B: int, group_size: int | None, group_ids_B, num_groups: int | None, name: str):
    """(ids_B clipped into range, valid_B, num_groups) for contiguous or ragged groups."""
    if group_ids_B is None:
        if group_size is None or group_size < 1 or B % group_size:
            raise ValueError(f"{name}: batch of {B} rewards is not divisible into groups of group_size={group_size}")
        return jnp.arange(B) // group_size, jnp.ones((B,), bool), B // group_size
    group_ids_B = jnp.asarray(group_ids_B)
    if group_ids_B.shape != (B,) or not jnp.issubdtype(group_ids_B.dtype, jnp.integer):
        raise ValueError(f"{name}: group_ids_B must be an integer array of shape ({B},), "
                         f"got {group_ids_B.shape} {group_ids_B.dtype}")
    if num_groups is None or num_groups < 1:
        raise ValueError(f"{name}: group_ids_B needs a static num_groups >= 1, got {num_groups}")
    valid_B = (group_ids_B >= 0) & (group_ids_B < num_groups)
    return jnp.where(valid_B, group_ids_B, 0), valid_B, num_groups


def segment_moments(x_N: jax.Array, seg_N: jax.Array, valid_N: jax.Array, num_segments: int):
    """(count_S, mean_S, m2_S) over the valid entries of each segment, m2 = Σ (x - mean)² (two-pass).

    Invalid entries are replaced by 0 before any arithmetic; an empty segment has count 0, mean 0, m2 0.
    """
    x_N = jnp.where(valid_N, x_N, 0.0)
    seg = lambda v: jax.ops.segment_sum(jnp.where(valid_N, v, 0.0), seg_N, num_segments)  # noqa: E731
    count_S = seg(jnp.ones_like(x_N))
    max_S = jax.ops.segment_max(jnp.where(valid_N, x_N, -jnp.inf), seg_N, num_segments)
    min_S = jax.ops.segment_min(jnp.where(valid_N, x_N, jnp.inf), seg_N, num_segments)
    const_S = (max_S == min_S) & (count_S > 0)
    mean_S = jnp.where(const_S, jnp.where(const_S, max_S, 0.0), seg(x_N) / jnp.maximum(count_S, 1.0))
    m2_S = seg((x_N - mean_S[seg_N]) ** 2)
    return count_S, mean_S, jnp.where(const_S, 0.0, m2_S)


def safe_sqrt(var: jax.Array) -> jax.Array:
    """sqrt with a finite (zero) gradient at 0."""
    return jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)


def scaled(centred: jax.Array, std: jax.Array, eps: float) -> jax.Array:
    """centred / (std + eps), and 0 where std + eps == 0 (callers guarantee centred == 0 there)."""
    den = std + eps
    return jnp.where(den > 0, centred / jnp.where(den > 0, den, 1.0), 0.0)


class RunningMoments(NamedTuple):
    """Running mean and (population) variance of rewards; ``count`` = number of batches folded in."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls) -> RunningMoments:
        return cls(mean=jnp.zeros((), jnp.float32), var=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))


def running_moments_update(
    state: RunningMoments, rewards_B: jax.Array, *, momentum: float, valid_B: jax.Array | None = None
) -> RunningMoments:
    """Fold one batch into the running moments with exponential forgetting (a batched West/Welford update).

    With x̄, v the mean and population variance of the batch's valid rewards, m, s² the state, μ = momentum
    and w = μ once a batch has been seen (w = 0 for the first, so it starts at the batch statistics):

        δ = x̄ - m,   m' = m + (1 - w)·δ,   s²' = w·s² + (1 - w)·v + w(1 - w)·δ²

    i.e. the exact mean and variance of the mixture that weighs the past by w and the new batch by 1 - w. A batch
    with no valid reward leaves the state unchanged. Pure: returns the new state.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"running_moments_update: momentum must be in [0, 1), got {momentum}")
    r_B = _f32("running_moments_update: rewards_B", rewards_B, 1)
    valid_B = jnp.ones(r_B.shape, bool) if valid_B is None else jnp.asarray(valid_B, bool)
    n, mean, m2 = (a[0] for a in segment_moments(r_B, jnp.zeros(r_B.shape, jnp.int32), valid_B, 1))
    w = jnp.where(state.count > 0, momentum, 0.0)
    delta = mean - state.mean
    new = RunningMoments(
        mean=state.mean + (1.0 - w) * delta,
        var=w * state.var + (1.0 - w) * m2 / jnp.maximum(n, 1.0) + w * (1.0 - w) * delta**2,
        count=state.count + 1,
    )
    return jax.tree.map(lambda a, b: jnp.where(n > 0, a, b), new, state)


def whiten(
    x_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    eps: float = 1e-8,
    segment_ids_B: jax.Array | None = None,
    num_segments: int = 1,
) -> jax.Array:
    """Masked whitening (PPO's advantage normalisation): over the valid tokens of each segment of rows,

        x̃_it = (x_it - mean_S) / (std_S + eps),   std_S the population (ddof=0) std

    with one segment (the whole batch) by default, or row i in segment ``segment_ids_B[i]``. A segment whose valid
    values are all equal gives exactly 0. Masked positions give 0. Returns float32 (B, T).
    """
    x = _f32("whiten: x_BxT", x_BxT, 2)
    mask = jnp.asarray(mask_BxT).astype(bool)
    if mask.shape != x.shape:
        raise ValueError(f"whiten: mask_BxT has shape {mask.shape}, expected {x.shape}")
    B, T = mask.shape
    seg_B = jnp.zeros((B,), jnp.int32) if segment_ids_B is None else jnp.asarray(segment_ids_B)
    seg_N = jnp.broadcast_to(seg_B[:, None], (B, T)).reshape(-1)
    count_S, mean_S, m2_S = segment_moments(x.reshape(-1), seg_N, mask.reshape(-1), num_segments)
    std_S = safe_sqrt(m2_S / jnp.maximum(count_S, 1.0))
    x_N = jnp.where(mask.reshape(-1), x.reshape(-1), 0.0)
    out_N = scaled(x_N - mean_S[seg_N], std_S[seg_N], eps)
    return jnp.where(mask, out_N.reshape(B, T), 0.0)
