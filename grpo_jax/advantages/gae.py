"""Generalised advantage estimation for PPO's critic (pure JAX): per-token rewards, GAE and its returns.

Token t of row i is an action taken in state s_it (prompt + completion tokens before t); ``values_BxT[i, t]`` is the
critic's V(s_it). Masked positions are skipped: the recursions run over each row's valid tokens in order, as if the
masked ones were removed (so a prompt prefix, right padding or ragged rows all work), and the episode ends after the
last valid token (bootstrap value 0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from grpo_jax.advantages.stats import whiten
from grpo_jax.losses.terms import as_f32, as_mask

if TYPE_CHECKING:
    from grpo_jax.losses.ppo import PPOConfig


def terminal_rewards(rewards_B: jax.Array, mask_BxT: jax.Array, per_token_BxT: jax.Array | None = None) -> jax.Array:
    """Per-token rewards in the LLM convention: the sequence reward r_i sits on the row's last valid token,

        ρ_it = r_i·[t = last valid t of row i] + u_it·m_it      (u = ``per_token_BxT``, e.g. -β·k1_it; 0 if None)

    A row with no valid token receives nothing. Returns float32 (B, T), 0 where masked.
    """
    mask = as_mask(mask_BxT)
    B, T = mask.shape
    r_B = as_f32("rewards_B", jnp.asarray(rewards_B).astype(jnp.float32), (B,))
    last_B = T - 1 - jnp.argmax(jnp.flip(mask, axis=1), axis=1)
    at_last = (jnp.arange(T)[None, :] == last_B[:, None]) & mask
    out = jnp.where(at_last, r_B[:, None], 0.0)
    if per_token_BxT is not None:
        out = out + jnp.where(mask, as_f32("per_token_BxT", per_token_BxT, (B, T)), 0.0)
    return out


def gae_advantages(
    rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) over each row's valid tokens:

        δ_t = ρ_t + γ·V_{t+1} - V_t,   A_t = Σ_{k>=0} (γλ)^k δ_{t+k} = δ_t + γλ·A_{t+1},   R_t = A_t + V_t

    with t, t+1 consecutive *valid* tokens and V, A = 0 after the last one (terminal). A reverse ``lax.scan``.
    Returns (adv_BxT, returns_BxT), float32, 0 where masked, without gradient (they are regression/PG targets).
    """
    mask = as_mask(mask_BxT)
    r = jnp.where(mask, as_f32("rewards_BxT", rewards_BxT, mask.shape), 0.0)
    v = jnp.where(mask, as_f32("values_BxT", values_BxT, mask.shape), 0.0)

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        return (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a)), jnp.where(m_t, a_t, 0.0)

    zeros_B = jnp.zeros(mask.shape[:1], jnp.float32)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (r.T, v.T, mask.T), reverse=True)
    adv = adv_TxB.T
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(jnp.where(mask, adv + v, 0.0))


def ppo_advantages(
    rewards_B: jax.Array,
    values_BxT: jax.Array,
    mask_BxT: jax.Array,
    cfg: PPOConfig,
    per_token_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(adv_BxT, returns_BxT): ``terminal_rewards`` -> ``gae_advantages`` -> ``whiten`` of the advantages if
    ``cfg.whiten_advantages`` (the returns keep the raw advantages: R = A_raw + V)."""
    rho = terminal_rewards(rewards_B, mask_BxT, per_token_BxT)
    adv, returns = gae_advantages(rho, values_BxT, mask_BxT, gamma=cfg.gamma, lam=cfg.lam)
    return (whiten(adv, mask_BxT) if cfg.whiten_advantages else adv), returns
