"""DPO / IPO preference losses on sequence log-probs, online pairs from GRPO groups, and the GRPO+DPO hybrid.

A pair p compares a chosen completion c_p with a rejected one r_p of the same prompt. Offline pairs come from a
preference dataset; online pairs from each GRPO group's best and worst response (``group_preference_pairs``). The
log-probs are ``sequence_logps`` of the completion tokens under the trained policy π_θ and the frozen reference.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from grpo_jax.losses.terms import as_f32, as_mask, check_choice, safe_divide

DPOKind = Literal["sigmoid", "ipo"]
PairSource = Literal["online"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Preference side of ``algo.kind`` dpo / hybrid: ``dpo_loss`` settings (``beta``, ``label_smoothing``,
    ``kind``), the hybrid weight ``alpha`` (``hybrid_loss``) and where pairs come from (``pairs="online"``: the best
    and worst response of each rollout group, ``group_preference_pairs``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    kind: DPOKind = "sigmoid"
    alpha: float = 0.5
    pairs: PairSource = "online"

    def __post_init__(self):
        check_choice("kind", self.kind, DPOKind)
        check_choice("pairs", self.pairs, PairSource)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5 or (self.kind == "ipo" and self.label_smoothing):
            raise ValueError(
                f"label_smoothing must be in [0, 0.5) and applies to kind='sigmoid' only, got {self.label_smoothing}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def sequence_logps(logp_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """log π(o_i | q_i) = Σ_t m_it·logp_it (masked positions, even -inf, contribute 0). Returns float32 (B,)."""
    mask = as_mask(mask_BxT)
    return jnp.sum(jnp.where(mask, as_f32("logp_BxT", logp_BxT, mask.shape), 0.0), axis=1)


def dpo_loss_parts(
    policy_chosen_logp_P: jax.Array,
    policy_rejected_logp_P: jax.Array,
    ref_chosen_logp_P: jax.Array,
    ref_rejected_logp_P: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    kind: DPOKind = "sigmoid",
    valid_P: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(Σ_p v_p ℓ_p, Σ_p v_p, stats) of ``dpo_loss``: sum both parts over micro-batches of pairs (``merge_stats``
    the stats) and divide once for the exact full-batch loss; ``finalize_dpo_stats`` gives the metrics."""
    DPOConfig(beta=beta, label_smoothing=label_smoothing, kind=kind)  # the same checks as the config's
    pc = as_f32("policy_chosen_logp_P", policy_chosen_logp_P)
    if pc.ndim != 1:
        raise ValueError(f"policy_chosen_logp_P must be 1-D (P,), got shape {pc.shape}")
    pr, rc, rr = (as_f32(n, x, pc.shape) for n, x in (
        ("policy_rejected_logp_P", policy_rejected_logp_P), ("ref_chosen_logp_P", ref_chosen_logp_P),
        ("ref_rejected_logp_P", ref_rejected_logp_P)))
    valid = jnp.ones(pc.shape, bool) if valid_P is None else jnp.asarray(valid_P).astype(bool)
    if valid.shape != pc.shape:
        raise ValueError(f"valid_P has shape {valid.shape}, expected {pc.shape}")
    pc, pr, rc, rr = (jnp.where(valid, x, 0.0) for x in (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        loss_P = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    else:
        loss_P = (h - 1.0 / (2.0 * beta)) ** 2
    total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
    chosen, rejected = jax.lax.stop_gradient(beta * (pc - rc)), jax.lax.stop_gradient(beta * (pr - rr))
    stats = {
        "pairs": jnp.sum(valid, dtype=jnp.float32),
        "reward_accuracy_sum": total((chosen > rejected).astype(jnp.float32)),
        "chosen_reward_sum": total(chosen),
        "rejected_reward_sum": total(rejected),
        "reward_margin_sum": total(chosen - rejected),
    }
    return total(loss_P), stats["pairs"], stats


def finalize_dpo_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Pair sums -> means over the valid pairs (0 when there is none)."""
    return {k.removesuffix("_sum"): safe_divide(v, stats["pairs"]) for k, v in stats.items() if k.endswith("_sum")}


def dpo_loss(
    policy_chosen_logp_P: jax.Array,
    policy_rejected_logp_P: jax.Array,
    ref_chosen_logp_P: jax.Array,
    ref_rejected_logp_P: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    kind: DPOKind = "sigmoid",
    valid_P: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean preference loss over the valid pairs. With the implicit rewards ĉ_p = β(log π_θ(c_p) - log π_ref(c_p)),
    r̂_p = β(log π_θ(r_p) - log π_ref(r_p)) and h_p = (ĉ_p - r̂_p)/β:

        kind="sigmoid" (DPO, Rafailov et al. 2023, arXiv:2305.18290; label smoothing ε = conservative DPO,
                        Mitchell 2023):  ℓ_p = -(1-ε)·log σ(β h_p) - ε·log σ(-β h_p)
        kind="ipo"     (IPO, Azar et al. 2023, arXiv:2310.12036):  ℓ_p = (h_p - 1/(2β))²

        L = Σ_p v_p ℓ_p / Σ_p v_p      (v = ``valid_P``, all ones by default; 0 when no pair is valid)

    Returns (loss, metrics): reward_accuracy (fraction with ĉ > r̂), chosen_reward, rejected_reward, reward_margin
    (means of ĉ, r̂, ĉ - r̂ over valid pairs). Inputs may be bfloat16; results are float32.
    """
    num, den, stats = dpo_loss_parts(
        policy_chosen_logp_P, policy_rejected_logp_P, ref_chosen_logp_P, ref_rejected_logp_P,
        beta=beta, label_smoothing=label_smoothing, kind=kind, valid_P=valid_P,
    )
    return safe_divide(num, den), finalize_dpo_stats(stats)


def group_preference_pairs(rewards_B: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online pairs from group-contiguous GRPO rollouts, one per group g (P = B / group_size):

        chosen_g = g·G + argmax_j r_{gG+j},   rejected_g = g·G + argmin_j r_{gG+j},   valid_g = max_g > min_g

    Ties go to the lowest index. A constant group (all solved or all failed) has no preference: valid_g = False
    (its indices are still in range, so gathers stay safe). Returns int32 chosen_idx_P, rejected_idx_P, bool valid_P.
    """
    rewards_B = jnp.asarray(rewards_B)
    if rewards_B.ndim != 1 or group_size < 2 or rewards_B.shape[0] % group_size:
        raise ValueError(
            f"group_preference_pairs: rewards_B must be 1-D with a length divisible by group_size={group_size} >= 2, "
            f"got shape {rewards_B.shape}"
        )
    r_PxG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    offset_P = jnp.arange(r_PxG.shape[0], dtype=jnp.int32) * group_size
    chosen = offset_P + jnp.argmax(r_PxG, axis=1).astype(jnp.int32)
    rejected = offset_P + jnp.argmin(r_PxG, axis=1).astype(jnp.int32)
    return chosen, rejected, jnp.max(r_PxG, axis=1) > jnp.min(r_PxG, axis=1)


def hybrid_loss(grpo_loss: jax.Array, dpo_loss: jax.Array, *, alpha: float) -> jax.Array:
    """GRPO+DPO hybrid objective, a convex combination of the two losses on the same rollout batch:

        L = (1 - α)·L_GRPO + α·L_DPO,   α in [0, 1]

    L_GRPO is the aggregated GRPO objective (``grpo_objective``) on all B rollouts; L_DPO is ``dpo_loss`` on the
    online pairs of ``group_preference_pairs``: per group, the best response is chosen and the worst rejected,
    sequence log-probs (``sequence_logps``) from the same policy forward pass and from the reference model, with
    pairs from constant groups masked out (valid_P). α = 0 is GRPO, α = 1 is online DPO. Since the DPO term pairs
    responses within a group, micro-batches must keep whole groups together for the sum to stay exact.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * jnp.asarray(grpo_loss, jnp.float32) + alpha * jnp.asarray(dpo_loss, jnp.float32)


def online_dpo_parts(
    logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    rewards_B: jax.Array,
    group_size: int,
    cfg: DPOConfig,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``dpo_loss_parts`` on the online pairs of group-contiguous rollouts: ``group_preference_pairs`` picks each
    group's best (chosen) and worst (rejected) row, whose ``sequence_logps`` over ``mask_BxT`` (the completion tokens)
    under the policy and the reference enter the loss; constant groups are left out."""
    chosen_P, rejected_P, valid_P = group_preference_pairs(rewards_B, group_size)
    seq_B, ref_B = sequence_logps(logp_BxT, mask_BxT), sequence_logps(ref_logp_BxT, mask_BxT)
    return dpo_loss_parts(seq_B[chosen_P], seq_B[rejected_P], ref_B[chosen_P], ref_B[rejected_P], beta=cfg.beta,
                          label_smoothing=cfg.label_smoothing, kind=cfg.kind, valid_P=valid_P)
