"""The GRPO objective: clipped policy loss + β·KL(π_θ || π_ref), aggregated with one mode."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grpo_jax.losses.policy import finalize_stats, policy_loss_terms
from grpo_jax.losses.terms import (
    AggMode,
    KLKind,
    PolicyKind,
    aggregate_parts,
    as_mask,
    check_choice,
    kl_penalty,
    safe_divide,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss of one policy update; see ``grpo_objective``. Static (hashable) under jit."""

    kind: PolicyKind = "grpo"
    clip_low: float = 0.2
    clip_high: float | None = None  # None: same as clip_low (symmetric clip)
    dual_clip: float | None = None
    agg: AggMode = "seq-mean-token-mean"
    norm_len: float | None = None  # seq-mean-token-sum-norm only; None -> the trainer uses max_new_tokens
    beta: float = 0.04
    kl_kind: KLKind = "k3"

    def __post_init__(self):
        check_choice("kind", self.kind, PolicyKind)
        check_choice("agg", self.agg, AggMode)
        check_choice("kl_kind", self.kl_kind, KLKind)
        if not 0 < self.clip_low <= 1:
            raise ValueError(f"clip_low must be in (0, 1], got {self.clip_low}")
        if self.clip_high is not None and not self.clip_high > 0:
            raise ValueError(f"clip_high must be > 0 (or null for symmetric), got {self.clip_high}")
        if self.dual_clip is not None and (self.kind == "cispo" or not self.dual_clip > 1):
            raise ValueError(
                f"dual_clip must be > 1 and applies to kind grpo/gspo, got {self.dual_clip} with {self.kind}")
        if self.norm_len is not None and (self.agg != "seq-mean-token-sum-norm" or not self.norm_len > 0):
            raise ValueError(
                f"norm_len (>0) is only used with agg='seq-mean-token-sum-norm', got {self.norm_len} with {self.agg}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def grpo_objective_parts(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv: jax.Array,
    mask_BxT: jax.Array,
    cfg: LossConfig,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(numerator, denominator, stats) of ``grpo_objective``: sum numerators and denominators over micro-batches
    (and ``merge_stats`` the stats), then divide once, for the exact full-batch loss and gradient."""
    mask = as_mask(mask_BxT)
    pg_BxT, stats = policy_loss_terms(
        logp_BxT, old_logp_BxT, adv, mask,
        kind=cfg.kind, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
    )
    total_BxT = pg_BxT
    pg_num, den = aggregate_parts(pg_BxT, mask, cfg.agg, norm_len=cfg.norm_len)
    stats["pg_num"] = pg_num
    if cfg.beta > 0:
        if ref_logp_BxT is None:
            raise ValueError("beta > 0 needs ref_logp_BxT (log-probs of the reference model); pass it or set beta=0")
        logp = jnp.where(mask, logp_BxT, 0.0)
        kl_BxT = jnp.where(mask, kl_penalty(logp, jnp.where(mask, ref_logp_BxT, 0.0), cfg.kl_kind), 0.0)
        total_BxT = pg_BxT + cfg.beta * kl_BxT
        stats["kl_num"] = aggregate_parts(kl_BxT, mask, cfg.agg, norm_len=cfg.norm_len)[0]
        stats["kl_sum"] = jnp.sum(jax.lax.stop_gradient(kl_BxT))
    num, _ = aggregate_parts(total_BxT, mask, cfg.agg, norm_len=cfg.norm_len)
    stats["den"] = den
    return num, den, stats


def finalize_objective_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Merged objective stats -> logged metrics (pg_loss, kl_loss: each term's aggregated value)."""
    core = {k: v for k, v in stats.items() if k not in ("pg_num", "kl_num", "den")}
    out = finalize_stats(core)  # includes kl = token-mean KL when present
    out["pg_loss"] = jax.lax.stop_gradient(safe_divide(stats["pg_num"], stats["den"]))
    if "kl_num" in stats:
        out["kl_loss"] = jax.lax.stop_gradient(safe_divide(stats["kl_num"], stats["den"]))
    return out


def grpo_objective(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv: jax.Array,
    mask_BxT: jax.Array,
    cfg: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss (Shao et al. 2024) with the variants of ``cfg``:

        L = AGG_{i,t}[ ℓ^{clip}_it + β·KL_it ]

    where ℓ^{clip} is ``policy_loss``'s per-token term (kind grpo/gspo/cispo, ε_lo/ε_hi, dual clip), KL_it is
    ``kl_penalty(logp, ref_logp, cfg.kl_kind)`` (k3 by default), and AGG is ``cfg.agg`` (see ``aggregate_parts``).
    With cfg.beta == 0 the KL term and ``ref_logp_BxT`` are not used (may be None). Returns (loss, metrics):
    loss, pg_loss, kl_loss (β-free aggregated KL), kl (token-mean KL), clip_frac(_low/_high), ratio_mean/max/min.
    """
    num, den, stats = grpo_objective_parts(logp_BxT, old_logp_BxT, ref_logp_BxT, adv, mask_BxT, cfg)
    loss = safe_divide(num, den)
    metrics = finalize_objective_stats(stats)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
