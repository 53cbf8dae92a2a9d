"""Advantage estimators for critic-free policy gradients (pure JAX, jit/grad friendly).

Rewards are laid out group-contiguous: ``rewards_B`` with B = prompts * group_size, samples of prompt p at
``[p*G, (p+1)*G)``. Ragged groups (dynamic group size) pass ``group_ids_B`` instead: sample i belongs to group
``group_ids_B[i]`` in ``[0, num_groups)``; any other id (e.g. -1) marks a padding sample that gets advantage 0
and is left out of every statistic.

A group whose rewards are all exactly equal (max == min) gets advantage exactly 0 in every mode: in float32
the mean of (0.1, 0.1, 0.1) need not equal 0.1, and dividing that rounding noise by std + eps ~ eps would
otherwise turn it into a large spurious advantage.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp

Scale = Literal["group", "batch", "none"]
Estimator = Literal["group", "rloo"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    """How rewards become advantages. ``estimator='group'`` is GRPO's (r - mean_G) / (std + eps)."""

    estimator: Estimator = "group"
    scale: Scale = "group"
    eps: float = 1e-6

    def __post_init__(self):
        if self.estimator not in get_args(Estimator):
            raise ValueError(f"estimator={self.estimator!r}; choose one of {list(get_args(Estimator))}")
        if self.scale not in get_args(Scale):
            raise ValueError(f"scale={self.scale!r}; choose one of {list(get_args(Scale))}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.estimator == "rloo" and self.scale != "none":
            raise ValueError("estimator='rloo' takes no std scaling; set scale='none'")


def _rewards_f32(rewards_B, name: str) -> jax.Array:
    rewards_B = jnp.asarray(rewards_B)
    if rewards_B.ndim != 1:
        raise ValueError(f"{name}: rewards_B must be 1-D (B,), got shape {rewards_B.shape}")
    if not jnp.issubdtype(rewards_B.dtype, jnp.floating) and not jnp.issubdtype(rewards_B.dtype, jnp.integer):
        raise ValueError(f"{name}: rewards_B must be numeric, got dtype {rewards_B.dtype}")
    return rewards_B.astype(jnp.float32)


def _segments(B: int, group_size: int | None, group_ids_B, num_groups: int | None, name: str):
    """(ids_B clipped into range, valid_B, num_groups) for contiguous or ragged groups."""
    if group_ids_B is None:
        if group_size is None or group_size < 1 or B % group_size:
            raise ValueError(f"{name}: batch of {B} rewards is not divisible into groups of group_size={group_size}")
        return jnp.arange(B) // group_size, jnp.ones((B,), bool), B // group_size
    group_ids_B = jnp.asarray(group_ids_B)
    if group_ids_B.shape != (B,) or not jnp.issubdtype(group_ids_B.dtype, jnp.integer):
        raise ValueError(f"{name}: group_ids_B must be an integer array of shape ({B},), got {group_ids_B.shape} {group_ids_B.dtype}")
    if num_groups is None or num_groups < 1:
        raise ValueError(f"{name}: group_ids_B needs a static num_groups >= 1, got {num_groups}")
    valid_B = (group_ids_B >= 0) & (group_ids_B < num_groups)
    return jnp.where(valid_B, group_ids_B, 0), valid_B, num_groups


def _safe_sqrt(var: jax.Array) -> jax.Array:
    """sqrt with a finite gradient at 0 (var is 0 only for constant groups, whose advantage is masked to 0)."""
    return jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)


def _group_stats(r_B, ids_B, valid_B, n):
    """Per-sample group count, mean, centred reward and 'group is constant' flag."""
    seg = lambda x: jax.ops.segment_sum(jnp.where(valid_B, x, 0.0), ids_B, n)  # noqa: E731
    count_G = seg(jnp.ones_like(r_B))
    mean_G = seg(r_B) / jnp.maximum(count_G, 1.0)
    max_G = jax.ops.segment_max(jnp.where(valid_B, r_B, -jnp.inf), ids_B, n)
    min_G = jax.ops.segment_min(jnp.where(valid_B, r_B, jnp.inf), ids_B, n)
    centred_B = r_B - mean_G[ids_B]
    const_B = max_G[ids_B] == min_G[ids_B]
    return count_G, centred_B, const_B, seg


def group_advantages(
    rewards_B: jax.Array,
    group_size: int | None,
    *,
    scale: Scale = "group",
    eps: float = 1e-6,
    group_ids_B: jax.Array | None = None,
    num_groups: int | None = None,
) -> jax.Array:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath).

        A_i = (r_i - mean_{g(i)}) / (s + eps)

    with s = the unbiased (ddof=1) std of the sample's group for ``scale="group"``; the unbiased std of all
    (valid) raw rewards in the batch for ``scale="batch"`` (TRL ``scale_rewards="batch"``); and no division at all
    for ``scale="none"`` (Dr. GRPO, Liu et al. 2025). Constant groups give exactly 0. Returns float32 (B,).
    """
    name = "group_advantages"
    if scale not in get_args(Scale):
        raise ValueError(f"{name}: scale={scale!r}; choose one of {list(get_args(Scale))}")
    r_B = _rewards_f32(rewards_B, name)
    ids_B, valid_B, n = _segments(r_B.shape[0], group_size, group_ids_B, num_groups, name)
    count_G, centred_B, const_B, seg = _group_stats(r_B, ids_B, valid_B, n)
    if scale == "group":
        var_G = seg(centred_B**2) / jnp.maximum(count_G - 1.0, 1.0)
        adv_B = centred_B / (_safe_sqrt(var_G)[ids_B] + eps)
    elif scale == "batch":
        n_valid = jnp.sum(valid_B)
        mean = jnp.sum(jnp.where(valid_B, r_B, 0.0)) / jnp.maximum(n_valid, 1)
        var = jnp.sum(jnp.where(valid_B, (r_B - mean) ** 2, 0.0)) / jnp.maximum(n_valid - 1, 1)
        adv_B = centred_B / (_safe_sqrt(var) + eps)
    else:
        adv_B = centred_B
    return jnp.where(valid_B & ~const_B, adv_B, 0.0)


def rloo_advantages(
    rewards_B: jax.Array,
    group_size: int | None,
    *,
    group_ids_B: jax.Array | None = None,
    num_groups: int | None = None,
) -> jax.Array:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): the baseline of sample i is the mean of
    the other samples of its group,

        A_i = r_i - (1/(G_g - 1)) Σ_{j in g(i), j != i} r_j  =  G_g/(G_g - 1) * (r_i - mean_g)

    Groups of one sample and constant groups give 0. Returns float32 (B,).
    """
    name = "rloo_advantages"
    r_B = _rewards_f32(rewards_B, name)
    ids_B, valid_B, n = _segments(r_B.shape[0], group_size, group_ids_B, num_groups, name)
    count_G, centred_B, const_B, _ = _group_stats(r_B, ids_B, valid_B, n)
    g_B = count_G[ids_B]
    adv_B = centred_B * g_B / jnp.maximum(g_B - 1.0, 1.0)
    return jnp.where(valid_B & ~const_B & (g_B > 1), adv_B, 0.0)


def compute_advantages(rewards_B: jax.Array, group_size: int, cfg: AdvantageConfig) -> jax.Array:
    """Dispatch on ``cfg.estimator``."""
    if cfg.estimator == "rloo":
        return rloo_advantages(rewards_B, group_size)
    return group_advantages(rewards_B, group_size, scale=cfg.scale, eps=cfg.eps)


def kl_reward_advantages(
    adv_B: jax.Array, logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array, beta: float
) -> jax.Array:
    """KL as a per-token reward instead of a loss term (the RLHF/PPO form, Ouyang et al. 2022), for critic-free
    estimators: the sequence advantage plus the undiscounted return-to-go of the per-token reward -β·k1,

        A_it = A_i - β Σ_{t' >= t} m_it' (logp_it' - ref_it')

    with logp the rollout (behaviour) log-probs. No gradient flows through it. Returns float32 adv_BxT (0 where masked).
    """
    mask = jnp.asarray(mask_BxT).astype(bool)
    k1_BxT = jnp.where(mask, jnp.asarray(logp_BxT, jnp.float32) - jnp.asarray(ref_logp_BxT, jnp.float32), 0.0)
    to_go_BxT = jnp.flip(jnp.cumsum(jnp.flip(k1_BxT, axis=1), axis=1), axis=1)
    adv_BxT = jnp.asarray(adv_B, jnp.float32)[:, None] - beta * to_go_BxT
    return jax.lax.stop_gradient(jnp.where(mask, adv_BxT, 0.0))
