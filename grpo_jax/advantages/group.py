"""Advantage estimators for critic-free policy gradients (pure JAX, jit/grad friendly).

Rewards are laid out group-contiguous: ``rewards_B`` with B = prompts * group_size, samples of prompt p at
``[p*G, (p+1)*G)``. Ragged groups (dynamic group size) pass ``group_ids_B`` instead: sample i belongs to group
``group_ids_B[i]`` in ``[0, num_groups)``; any other id (e.g. -1) marks a padding sample that gets advantage 0
and is left out of every statistic.

A group whose rewards are all exactly equal (max == min) gets advantage exactly 0 in every mode: in float32
the mean of (0.1, 0.1, 0.1) need not equal 0.1, and dividing that rounding noise by std + eps ~ eps would
otherwise turn it into a large spurious advantage.

Cross-group references (``normalized_advantages`` with baseline "batch" or "running") deliberately break that
rule: a constant group is measured against a baseline shared across groups, so an all-solved group gets a
positive advantage when the batch (or the recent past) did worse. Token-level terms on top of the sequence
advantage: ``grpo_jax.advantages.tokens``.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from grpo_jax.advantages.stats import (
    RunningMoments,
    running_moments_update,
    safe_sqrt,
    scaled,
    segment_ids,
    segment_moments,
)
from grpo_jax.advantages.tokens import TokenNorm

Scale = Literal["group", "batch", "none"]
Estimator = Literal["group", "rloo"]
Baseline = Literal["group", "batch", "running"]
NormScale = Literal["group", "batch", "running", "none"]
_SCOPE = {"group": 0, "batch": 1, "running": 2}


def _check_baseline_scale(baseline: str, scale: str) -> None:
    if baseline not in get_args(Baseline):
        raise ValueError(f"baseline={baseline!r}; choose one of {list(get_args(Baseline))}")
    if scale not in get_args(NormScale):
        raise ValueError(f"scale={scale!r}; choose one of {list(get_args(NormScale))}")
    if scale != "none" and _SCOPE[scale] < _SCOPE[baseline]:
        allowed = [k for k in get_args(NormScale) if k == "none" or _SCOPE[k] >= _SCOPE[baseline]]
        raise ValueError(
            f"scale={scale!r} cannot follow baseline={baseline!r}: the spread must cover at least the samples the "
            f"baseline averages (group < batch < running), so a zero spread implies a zero centred reward; "
            f"choose scale in {allowed}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    """How rewards become advantages. ``estimator='group'`` is GRPO's (r - mean_G) / (std + eps); ``baseline`` and
    ``scale`` pick the reference and spread of ``normalized_advantages`` ("running" uses moments with forgetting
    factor ``momentum``); ``token_alpha``/``token_norm`` weight and normalise a token-level term added on top
    (``multiscale_advantages``; 0 turns it off)."""

    estimator: Estimator = "group"
    baseline: Baseline = "group"
    scale: NormScale = "group"
    eps: float = 1e-6
    momentum: float = 0.99
    token_alpha: float = 0.0
    token_norm: TokenNorm = "none"

    def __post_init__(self):
        if self.estimator not in get_args(Estimator):
            raise ValueError(f"estimator={self.estimator!r}; choose one of {list(get_args(Estimator))}")
        _check_baseline_scale(self.baseline, self.scale)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.estimator == "rloo" and self.scale != "none":
            raise ValueError("estimator='rloo' takes no std scaling; set scale='none'")
        if self.estimator == "rloo" and self.baseline != "group":
            raise ValueError("estimator='rloo' has its own leave-one-out baseline; set baseline='group'")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.token_alpha < 0:
            raise ValueError(f"token_alpha must be >= 0, got {self.token_alpha}")
        if self.token_norm not in get_args(TokenNorm):
            raise ValueError(f"token_norm={self.token_norm!r}; choose one of {list(get_args(TokenNorm))}")

    @property
    def stateful(self) -> bool:
        """True when the advantages need ``RunningMoments`` (use ``compute_advantages_with_state``)."""
        return "running" in (self.baseline, self.scale)


def _rewards_f32(rewards_B, name: str) -> jax.Array:
    rewards_B = jnp.asarray(rewards_B)
    if rewards_B.ndim != 1:
        raise ValueError(f"{name}: rewards_B must be 1-D (B,), got shape {rewards_B.shape}")
    if not jnp.issubdtype(rewards_B.dtype, jnp.floating) and not jnp.issubdtype(rewards_B.dtype, jnp.integer):
        raise ValueError(f"{name}: rewards_B must be numeric, got dtype {rewards_B.dtype}")
    return rewards_B.astype(jnp.float32)


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
    ids_B, valid_B, n = segment_ids(r_B.shape[0], group_size, group_ids_B, num_groups, name)
    count_G, centred_B, const_B, seg = _group_stats(r_B, ids_B, valid_B, n)
    if scale == "group":
        var_G = seg(centred_B**2) / jnp.maximum(count_G - 1.0, 1.0)
        adv_B = centred_B / (safe_sqrt(var_G)[ids_B] + eps)
    elif scale == "batch":
        n_valid = jnp.sum(valid_B)
        mean = jnp.sum(jnp.where(valid_B, r_B, 0.0)) / jnp.maximum(n_valid, 1)
        var = jnp.sum(jnp.where(valid_B, (r_B - mean) ** 2, 0.0)) / jnp.maximum(n_valid - 1, 1)
        adv_B = centred_B / (safe_sqrt(var) + eps)
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
    ids_B, valid_B, n = segment_ids(r_B.shape[0], group_size, group_ids_B, num_groups, name)
    count_G, centred_B, const_B, _ = _group_stats(r_B, ids_B, valid_B, n)
    g_B = count_G[ids_B]
    adv_B = centred_B * g_B / jnp.maximum(g_B - 1.0, 1.0)
    return jnp.where(valid_B & ~const_B & (g_B > 1), adv_B, 0.0)


def normalized_advantages(
    rewards_B: jax.Array,
    group_size: int | None,
    *,
    baseline: Baseline = "group",
    scale: NormScale = "group",
    eps: float = 1e-6,
    running: RunningMoments | None = None,
    group_ids_B: jax.Array | None = None,
    num_groups: int | None = None,
) -> jax.Array:
    """Advantages with a chosen reference and spread (bias fixes of GRPO's per-group normalisation):

        A_i = (r_i - b_i) / (s + eps)

    b_i: "group" the mean of i's group (GRPO); "batch" the mean of all valid rewards of the batch, shared across
    groups (REINFORCE++, Hu 2025); "running" ``running.mean``, moments already updated with this batch
    (``running_moments_update``), so the first step equals "batch".
    s: "group"/"batch" the unbiased std of i's group / of the batch (as ``group_advantages``); "running"
    sqrt(``running.var``) (adaptive normalisation); "none" no division (s + eps := 1).
    The spread must cover the baseline's samples (group < batch < running), so a zero spread implies a zero centred
    reward and the advantage is then 0, never noise / eps. Constant groups give exactly 0 only with
    baseline="group"; with a cross-group baseline they keep r_i - b, which is the point of sharing the reference.
    Baseline "group" with scale group/batch/none is exactly ``group_advantages``. Returns float32 (B,).
    """
    name = "normalized_advantages"
    _check_baseline_scale(baseline, scale)
    if "running" in (baseline, scale) and running is None:
        raise ValueError(f"{name}: baseline/scale 'running' needs running=RunningMoments (fold the batch in with "
                         "running_moments_update, or call compute_advantages_with_state)")
    if baseline == "group" and scale != "running":
        return group_advantages(rewards_B, group_size, scale=scale, eps=eps, group_ids_B=group_ids_B,
                                num_groups=num_groups)
    r_B = _rewards_f32(rewards_B, name)
    ids_B, valid_B, n = segment_ids(r_B.shape[0], group_size, group_ids_B, num_groups, name)
    if baseline == "group":
        _, centred_B, const_B, _ = _group_stats(r_B, ids_B, valid_B, n)
        centred_B = jnp.where(const_B, 0.0, centred_B)
    else:
        count, mean, m2 = (a[0] for a in segment_moments(r_B, jnp.zeros_like(ids_B), valid_B, 1))
        centred_B = r_B - (mean if baseline == "batch" else running.mean)
    if scale == "none":
        adv_B = centred_B
    elif scale == "batch":
        adv_B = scaled(centred_B, safe_sqrt(m2 / jnp.maximum(count - 1.0, 1.0)), eps)
    else:
        adv_B = scaled(centred_B, safe_sqrt(running.var), eps)
    return jnp.where(valid_B, adv_B, 0.0)


def _dispatch(rewards_B, group_size, cfg: AdvantageConfig, running, group_ids_B, num_groups) -> jax.Array:
    ragged = dict(group_ids_B=group_ids_B, num_groups=num_groups)
    if cfg.estimator == "rloo":
        return rloo_advantages(rewards_B, group_size, **ragged)
    return normalized_advantages(rewards_B, group_size, baseline=cfg.baseline, scale=cfg.scale, eps=cfg.eps,
                                 running=running, **ragged)


def compute_advantages(
    rewards_B: jax.Array, group_size: int | None, cfg: AdvantageConfig, *,
    group_ids_B: jax.Array | None = None, num_groups: int | None = None,
) -> jax.Array:
    """Dispatch on ``cfg.estimator``, ``cfg.baseline`` and ``cfg.scale`` (ragged groups: ``group_ids_B`` and
    ``num_groups`` as in ``group_advantages``); a config with running statistics (``cfg.stateful``) needs
    ``compute_advantages_with_state``."""
    if cfg.stateful:
        raise ValueError(f"baseline={cfg.baseline!r}, scale={cfg.scale!r} use running statistics carried across steps; "
                         "call compute_advantages_with_state(rewards_B, group_size, cfg, state)")
    return _dispatch(rewards_B, group_size, cfg, None, group_ids_B, num_groups)


def compute_advantages_with_state(
    rewards_B: jax.Array, group_size: int | None, cfg: AdvantageConfig, state: RunningMoments, *,
    group_ids_B: jax.Array | None = None, num_groups: int | None = None,
) -> tuple[jax.Array, RunningMoments]:
    """(adv_B, new_state): fold the batch's valid rewards into ``state`` (``running_moments_update`` with
    ``cfg.momentum``), then ``compute_advantages`` with the updated moments. The state is updated for every config.
    Start from ``RunningMoments.zeros()``; the loop keeps (and checkpoints) the returned state."""
    valid_B = None if group_ids_B is None else (jnp.asarray(group_ids_B) >= 0) & (jnp.asarray(group_ids_B) < num_groups)
    new_state = running_moments_update(state, rewards_B, momentum=cfg.momentum, valid_B=valid_B)
    return _dispatch(rewards_B, group_size, cfg, new_state, group_ids_B, num_groups), new_state
