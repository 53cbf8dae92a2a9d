"""PPO with a learned critic (Schulman et al. 2017) on the same rollouts: clipped value loss, and the PPO objective =
the clipped policy surrogate of ``policy_loss_terms`` on token-level advantages (GAE, ``grpo_jax.advantages.gae``) +
vf_coef · value loss, in one aggregation so micro-batching stays exact.

Token t of row i is an action taken in state s_it (prompt + completion tokens before t); ``values_BxT[i, t]`` is the
critic's V(s_it). Masked positions are skipped: the recursions run over each row's valid tokens in order, as if the
masked ones were removed (so a prompt prefix, right padding or ragged rows all work), and the episode ends after the
last valid token (bootstrap value 0).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from grpo_jax.losses.objective import LossConfig, finalize_objective_stats, grpo_objective_parts
from grpo_jax.losses.terms import aggregate_parts, as_f32, as_mask, safe_divide


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Critic side of PPO: GAE discount ``gamma`` and trace ``lam``, value-loss weight ``vf_coef`` and clip range
    ``value_clip`` (None: unclipped), and whether advantages are whitened over the batch's valid tokens.

    ``critic``: ``head`` (a value head on the policy's backbone, one optimizer) or ``separate`` (a second decoder
    as large as the policy, initialised from the policy after any warm start, or from the HF folder ``critic_path``
    such as a reward model; its own Adam state, clipping and learning rate ``critic_lr``, default ``optim.lr``)."""

    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    whiten_advantages: bool = True
    critic: Literal["head", "separate"] = "head"
    critic_path: str | None = None
    critic_lr: float | None = None

    def __post_init__(self):
        if self.critic not in ("head", "separate"):
            raise ValueError(f"critic must be 'head' or 'separate', got {self.critic!r}")
        if self.critic == "head" and (self.critic_path is not None or self.critic_lr is not None):
            raise ValueError("critic_path and critic_lr describe a separate critic: set critic: separate")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"critic_lr must be > 0, got {self.critic_lr}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip must be > 0 (or null for an unclipped value loss), got {self.value_clip}")


def value_loss_terms(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip: float | None = None,
) -> jax.Array:
    """Per-token critic loss (0 where masked); reduce it with ``aggregate_parts`` for exact micro-batching:

        clip=None:  ℓ_t = ½ (V_t - R_t)²
        clip=c:     ℓ_t = ½ max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)²)   (PPO2 / OpenAI baselines)
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    mask = as_mask(mask_BxT)
    v = jnp.where(mask, as_f32("values_BxT", values_BxT, mask.shape), 0.0)
    ret = jnp.where(mask, as_f32("returns_BxT", returns_BxT, mask.shape), 0.0)
    loss = (v - ret) ** 2
    if clip is not None:
        old = jnp.where(mask, as_f32("old_values_BxT", old_values_BxT, mask.shape), 0.0)
        loss = jnp.maximum(loss, (old + jnp.clip(v - old, -clip, clip) - ret) ** 2)
    return jnp.where(mask, 0.5 * loss, 0.0)


def ppo_objective_parts(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv_BxT: jax.Array,
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    loss_cfg: LossConfig,
    ppo_cfg: PPOConfig,
    *,
    behav_logp_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(numerator, denominator, stats) of the PPO loss

        L = AGG_{i,t}[ ℓ^{clip}_it + β·KL_it + c_v·ℓ^V_it ]

    where the first two terms are ``grpo_objective_parts`` with token-level A_it (set loss_cfg.beta = 0 when the KL
    is in the reward instead; ``behav_logp_BxT``: the sampler's log-probs, for ``loss_cfg.off_policy``), ℓ^V is
    ``value_loss_terms`` (clip = ppo_cfg.value_clip) and c_v = ppo_cfg.vf_coef. Gradients reach both the policy
    log-probs and the values. Sum parts over micro-batches, ``merge_stats`` the stats, divide once;
    ``finalize_ppo_stats`` adds ``vf_loss``.
    """
    mask = as_mask(mask_BxT)
    num, den, stats = grpo_objective_parts(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, mask, loss_cfg,
                                           behav_logp_BxT=behav_logp_BxT)
    vf_BxT = value_loss_terms(values_BxT, old_values_BxT, returns_BxT, mask, clip=ppo_cfg.value_clip)
    vf_num, _ = aggregate_parts(vf_BxT, mask, loss_cfg.agg, norm_len=loss_cfg.norm_len)
    stats["vf_num"] = vf_num
    return num + ppo_cfg.vf_coef * vf_num, den, stats


def finalize_ppo_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Merged ``ppo_objective_parts`` stats -> metrics: ``finalize_objective_stats`` plus vf_loss (unweighted)."""
    out = finalize_objective_stats({k: v for k, v in stats.items() if k != "vf_num"})
    out["vf_loss"] = jax.lax.stop_gradient(safe_divide(stats["vf_num"], stats["den"]))
    return out
