"""The GRPO objective: clipped policy loss (optionally corrected for sampler/trainer mismatch) + β·KL(π_θ || π_ref),
aggregated with one mode."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grpo_jax.losses.off_policy import OffPolicyConfig, correction_terms, finalize_mismatch_stats, mismatch_stats
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
    off_policy: OffPolicyConfig | None = None  # None: no correction; else needs behav_logp_BxT (see grpo_objective)

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
        if self.off_policy is not None and not isinstance(self.off_policy, OffPolicyConfig):
            raise ValueError(f"off_policy must be an OffPolicyConfig or None, got {self.off_policy!r}")


def _off_policy_parts(old_logp_BxT, behav_logp_BxT, mask_BxT, cfg: OffPolicyConfig | None):
    """(weight_BxT or None, stats): the correction's multiplier from π_prox = old_logp to μ = behav_logp."""
    if cfg is None:
        return None, {}
    if behav_logp_BxT is None:
        raise ValueError("LossConfig.off_policy is set: pass behav_logp_BxT (the sampler's log-probs stored with the "
                         "rollout), or set off_policy=None")
    weight_BxT, _, stats = correction_terms(old_logp_BxT, behav_logp_BxT, mask_BxT, cfg)
    return weight_BxT, stats | mismatch_stats(old_logp_BxT, behav_logp_BxT, mask_BxT)


def grpo_objective_parts(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv: jax.Array,
    mask_BxT: jax.Array,
    cfg: LossConfig,
    *,
    behav_logp_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(numerator, denominator, stats) of ``grpo_objective``: sum numerators and denominators over micro-batches
    (and ``merge_stats`` the stats), then divide once, for the exact full-batch loss and gradient. The denominator
    depends only on ``mask_BxT``, also with an off-policy correction (rejected tokens still count in it)."""
    mask = as_mask(mask_BxT)
    weight_BxT, off_stats = _off_policy_parts(old_logp_BxT, behav_logp_BxT, mask, cfg.off_policy)
    pg_BxT, stats = policy_loss_terms(
        logp_BxT, old_logp_BxT, adv, mask,
        kind=cfg.kind, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, weight_BxT=weight_BxT,
    )
    stats |= off_stats
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
    """Merged objective stats -> logged metrics (pg_loss, kl_loss: each term's aggregated value; mismatch/* with an
    off-policy correction, see ``finalize_mismatch_stats``)."""
    mismatch = {k: v for k, v in stats.items() if k.startswith("mismatch/")}
    core = {k: v for k, v in stats.items() if k not in ("pg_num", "kl_num", "den") and k not in mismatch}
    out = finalize_stats(core)  # includes kl = token-mean KL when present
    if mismatch:
        out |= finalize_mismatch_stats(mismatch)
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
    *,
    behav_logp_BxT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss (Shao et al. 2024) with the variants of ``cfg``:

        L = AGG_{i,t}[ sg(w_it·k_it)·ℓ^{clip}_it + β·KL_it ]

    where ℓ^{clip} is ``policy_loss``'s per-token term (kind grpo/gspo/cispo, ε_lo/ε_hi, dual clip) with the ratio
    r_it = π_θ/π_old, KL_it is ``kl_penalty(logp, ref_logp, cfg.kl_kind)`` (k3 by default), and AGG is ``cfg.agg``
    (see ``aggregate_parts``). With cfg.beta == 0 the KL term and ``ref_logp_BxT`` are not used (may be None).

    w·k = 1 unless ``cfg.off_policy`` is set; then π_old is the proximal policy (the trainer's log-probs of the
    rollout before the update), ``behav_logp_BxT`` the sampler's (μ), and w_it·k_it is
    ``off_policy.correction_terms``' weight of ρ = π_old/μ (truncated IS, AReaL's decoupled weight, rejection).
    Rejected tokens contribute 0 to the numerator but still count in AGG's denominator, which depends only on
    ``mask_BxT`` (as in AReaL and slime; verl instead drops them from its response mask): the precomputed
    denominators and exact micro-batching stay as they are. The KL term is not weighted.
    Returns (loss, metrics): loss, pg_loss, kl_loss (β-free aggregated KL), kl (token-mean KL),
    clip_frac(_low/_high), ratio_mean/max/min, and with off_policy the ``mismatch/*`` metrics.
    """
    num, den, stats = grpo_objective_parts(logp_BxT, old_logp_BxT, ref_logp_BxT, adv, mask_BxT, cfg,
                                           behav_logp_BxT=behav_logp_BxT)
    loss = safe_divide(num, den)
    metrics = finalize_objective_stats(stats)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
