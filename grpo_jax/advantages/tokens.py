"""Token-level advantages on top of a sequence-level one (pure JAX): return-to-go, multi-scale advantages and the
KL as a per-token reward.

``grpo_jax.advantages.group`` turns rewards into a per-sequence ``adv_B``; the functions here add a per-token term so
the policy loss receives ``adv_BxT`` (which ``policy_loss_terms`` accepts as is).
"""
from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from grpo_jax.advantages.stats import segment_ids, whiten
from grpo_jax.losses.terms import as_f32, as_mask

TokenNorm = Literal["none", "batch", "group"]


def reward_to_go(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Undiscounted return-to-go over valid tokens, G_it = Σ_{t' >= t} m_it' v_it'; 0 where masked. float32."""
    mask = as_mask(mask_BxT)
    v = jnp.where(mask, as_f32("values_BxT", values_BxT, mask.shape), 0.0)
    return jnp.where(mask, jnp.flip(jnp.cumsum(jnp.flip(v, axis=1), axis=1), axis=1), 0.0)


def multiscale_advantages(
    adv_B: jax.Array,
    token_term_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    alpha: float,
    normalize: TokenNorm = "none",
    group_size: int | None = None,
    group_ids_B: jax.Array | None = None,
    num_groups: int | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Multi-scale advantage: the sequence-level (group) advantage plus a weighted token-level term,

        A_it = A_i + α·ã_it,   ã_it = u_it                                   normalize="none"
                               ã_it = (u_it - mean_S) / (std_S + eps)         normalize="batch" | "group"

    with u = ``token_term_BxT`` (e.g. ``reward_to_go(-k1)``, the KL return-to-go, or a per-token reward) and
    mean_S, std_S (population) over the valid tokens of the whole batch ("batch") or of the rows of i's group
    ("group": ``group_size``, or ragged ``group_ids_B``/``num_groups``; padding rows give 0). A segment whose
    token terms are all equal gets ã = 0. No gradient flows through it. Returns float32 adv_BxT (0 where masked).
    """
    if normalize not in get_args(TokenNorm):
        raise ValueError(f"normalize={normalize!r}; choose one of {list(get_args(TokenNorm))}")
    mask = as_mask(mask_BxT)
    u = as_f32("token_term_BxT", token_term_BxT, mask.shape)
    a_B = as_f32("adv_B", adv_B, mask.shape[:1])
    if normalize == "batch":
        u = whiten(u, mask, eps=eps)
    elif normalize == "group":
        ids_B, valid_B, n = segment_ids(mask.shape[0], group_size, group_ids_B, num_groups, "multiscale_advantages")
        mask = mask & valid_B[:, None]
        u = whiten(u, mask, eps=eps, segment_ids_B=ids_B, num_segments=n)
    return jax.lax.stop_gradient(jnp.where(mask, a_B[:, None] + alpha * u, 0.0))


def kl_return_to_go(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """The return-to-go of the per-token reward -k1: u_it = -Σ_{t' >= t} m_it' (logp_it' - ref_it'), with logp the
    policy's log-probs of the rollout (GRPO passes the trainer's before the update, ``Passes.policy``, so the KL is
    KL(π_θ‖π_ref) rather than the sampler's). float32, 0 where masked."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    k1_BxT = jnp.where(mask, jnp.asarray(logp_BxT, jnp.float32) - jnp.asarray(ref_logp_BxT, jnp.float32), 0.0)
    return -reward_to_go(k1_BxT, mask)


def kl_reward_advantages(
    adv_B: jax.Array, logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array, beta: float
) -> jax.Array:
    """KL as a per-token reward instead of a loss term (the RLHF/PPO form, Ouyang et al. 2022), for critic-free
    estimators: the sequence advantage plus the undiscounted return-to-go of the per-token reward -β·k1,

        A_it = A_i - β Σ_{t' >= t} m_it' (logp_it' - ref_it')

    with logp the policy's log-probs of the rollout (as in ``kl_return_to_go``). No gradient flows through it.
    Returns float32 adv_BxT (0 where masked).
    """
    return multiscale_advantages(adv_B, kl_return_to_go(logp_BxT, ref_logp_BxT, mask_BxT), mask_BxT, alpha=beta)
