"""The per-micro-batch loss of each ``algo.kind``, as exact parts for ``train_step``'s gradient accumulation.

Every kind's loss is a sum of (numerator_k / denominator) terms whose denominators come from the full batch
(``denominators``), so summing micro-batch losses and gradients gives the full-batch ones:

    grpo:    L = num_pg / den_pg                                     (``grpo_objective_parts``)
    ppo:     L = (num_pg + c_v·num_vf) / den_pg                      (``ppo_objective_parts``)
    dpo:     L = Σ_p v_p ℓ_p / Σ_p v_p                               (``online_dpo_parts``)
    hybrid:  L = (1-α)·L_grpo + α·L_dpo                              (``hybrid_loss``)

Online pairs are taken inside a micro-batch, so for dpo/hybrid each micro-batch holds whole groups (train_step
splits those batches into contiguous micro-batches).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from grpo_jax.losses import (
    DPOConfig,
    LossConfig,
    PPOConfig,
    aggregate_parts,
    finalize_dpo_stats,
    finalize_objective_stats,
    finalize_ppo_stats,
    group_preference_pairs,
    grpo_objective_parts,
    hybrid_loss,
    merge_stats,
    online_dpo_parts,
    ppo_objective_parts,
)
from grpo_jax.losses.terms import safe_divide

AlgoKind = Literal["grpo", "ppo", "dpo", "hybrid"]
PAIRED = ("dpo", "hybrid")


def denominators(kind: AlgoKind, loss_cfg: LossConfig, batch, group_size: int | None) -> dict[str, jax.Array]:
    """Full-batch denominators: ``pg`` (the aggregation's, from the loss mask) and, for dpo/hybrid, ``pairs``
    (the number of valid online pairs); each is replaced by 1 when it is 0 (the loss is then 0)."""
    den = aggregate_parts(jnp.zeros(batch.loss_mask_BxS.shape), batch.loss_mask_BxS, loss_cfg.agg,
                          norm_len=loss_cfg.norm_len)[1]
    out = {"pg": jnp.where(den > 0, den, 1.0)}
    if kind in PAIRED:
        if batch.rewards_B is None:
            raise ValueError(f"algo.kind={kind} needs batch.rewards_B to build its online pairs")
        pairs = jnp.sum(group_preference_pairs(batch.rewards_B, group_size)[2], dtype=jnp.float32)
        out["pairs"] = jnp.where(pairs > 0, pairs, 1.0)
    return out


def micro_objective(
    kind: AlgoKind,
    loss_cfg: LossConfig,
    ppo_cfg: PPOConfig | None,
    dpo_cfg: DPOConfig | None,
    group_size: int | None,
    logp_BxS: jax.Array,
    old_logp_BxS: jax.Array,
    values_BxS: jax.Array | None,
    mb,
    dens: dict[str, jax.Array],
) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
    """(this micro-batch's share of the loss, {"pg": ..., "dpo": ...} stats to ``merge``)."""
    mask = mb.loss_mask_BxS
    stats: dict[str, dict[str, jax.Array]] = {}
    if kind == "ppo":
        num, _, stats["pg"] = ppo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, values_BxS,
                                                  mb.old_values_BxS, mb.returns_BxS, mask, loss_cfg, ppo_cfg)
        return num / dens["pg"], stats
    if kind in ("grpo", "hybrid"):
        num, _, stats["pg"] = grpo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, mask, loss_cfg)
        if kind == "grpo":
            return num / dens["pg"], stats
    else:
        stats["pg"] = {"tokens": jnp.sum(mask, dtype=jnp.float32)}
    if mb.ref_logp_BxS is None:
        raise ValueError(f"algo.kind={kind} needs the reference model's log-probs (batch.ref_logp_BxS)")
    dpo_num, _, stats["dpo"] = online_dpo_parts(logp_BxS, mb.ref_logp_BxS, mask, mb.rewards_B, group_size, dpo_cfg)
    stats["dpo"]["loss_num"] = jax.lax.stop_gradient(dpo_num)
    dpo_part = dpo_num / dens["pairs"]
    if kind == "dpo":
        return dpo_part, stats
    return hybrid_loss(num / dens["pg"], dpo_part, alpha=dpo_cfg.alpha), stats


def merge(a: dict[str, dict[str, jax.Array]], b: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
    return {k: merge_stats(a[k], b[k]) for k in a}


def finalize(kind: AlgoKind, stats: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Merged stats -> metrics: the policy objective's (``vf_loss`` for ppo), and for dpo/hybrid ``dpo_loss``,
    ``dpo_pairs`` and ``dpo_<metric>`` of ``finalize_dpo_stats`` (reward_accuracy, margins)."""
    pg = stats["pg"]
    if kind == "dpo":
        out = {"entropy": safe_divide(pg["entropy_sum"], pg["tokens"])} if "entropy_sum" in pg else {}
    else:
        out = (finalize_ppo_stats if kind == "ppo" else finalize_objective_stats)(pg)
    if "dpo" in stats:
        d = stats["dpo"]
        out |= {f"dpo_{k}": v for k, v in finalize_dpo_stats(d).items()}
        out |= {"dpo_loss": safe_divide(d["loss_num"], d["pairs"]), "dpo_pairs": d["pairs"]}
    return out
