"""Off-policy correction for the gap between the sampler and the trainer, as pure functions of log-probs.

The behaviour policy μ is the sampler that produced the rollout (its log-probs ``behav_logp_BxT`` are stored with
it); the proximal policy π_prox is the trainer's own policy scoring the same tokens before the update (the objective's
``old_logp_BxT``). Even with the same weights the two differ (bf16 kernels, another engine, an async sampler a few
versions behind), so the samples are slightly off-policy for the trainer. With d_it = log π_prox(o_it) - log μ(o_it)
and the importance ratio ρ at one of three levels (|o_i| = the row's valid tokens, m the mask):

    token       log ρ_it = d_it
    sequence    log ρ_it = Σ_t' m_it' d_it'             (the product of the row's token ratios; broadcast to its tokens)
    geometric   log ρ_it = (1/|o_i|) Σ_t' m_it' d_it'   (their geometric mean)

the correction multiplies each token's policy-gradient term by a stop-gradient weight w_it·k_it:

    weight  none        w = 1                                 (rejection only, or only the mismatch metrics)
            truncate    w = min(ρ, C)                         (truncated IS, TIS: Yao et al. 2025; verl rollout_is)
            decoupled   w = ρ, and tokens with ρ > C dropped  (AReaL's decoupled PPO, Fu et al. 2025: the behaviour
                                                               weight π_prox/μ with behav_imp_weight_cap = C)
    reject  none        k = m
            mask        k = m·1[lo <= ρ <= hi]                (masked IS / rejection: verl rollout_rs, IcePop)

All comparisons are made in log space, so a 1000-token sequence ratio neither overflows nor underflows.

Stats are merge-able (``grpo_jax.losses.policy.merge_stats``): counts and ``*_sum`` add, ``*_max``/``*_min`` take
the extreme; ``finalize_mismatch_stats`` turns the merged dict into the logged ``mismatch/*`` metrics.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from grpo_jax.losses.terms import as_f32, as_mask, check_choice, safe_divide

OffPolicyWeight = Literal["none", "truncate", "decoupled"]
OffPolicyReject = Literal["none", "mask"]
OffPolicyLevel = Literal["token", "sequence", "geometric"]

LOG_RATIO_BOUND = 20.0  # |log r| bound of the logged ratio and k3 only (as verl's safety bound), never of weights

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffPolicyConfig:
    """How the policy-gradient term is corrected for sampler/trainer mismatch; see the module docstring.

    weight: none | truncate (w = min(ρ, cap)) | decoupled (w = ρ, tokens with ρ > cap dropped, AReaL).
    level: token | sequence | geometric — which ratio ρ the weight and the rejection use.
    cap: C >= 1 of truncate/decoupled (verl's rollout_is_threshold; AReaL's behav_imp_weight_cap).
    reject: none | mask (drop tokens, or whole rows at sequence/geometric level, with ρ outside
        [reject_low, reject_high]; verl's rollout_rs with rollout_rs_threshold(_lower)).
    weight='none', reject='none' leaves the loss unchanged and only adds the mismatch metrics; weight='truncate'
    with cap=inf is plain (untruncated) IS. With the surrogate's ratio r = π_θ/π_prox (π_prox as ``old_logp``),
    verl's token TIS and AReaL's decoupled objective share the clipped surrogate and the weight π_prox/μ; they
    differ only above the cap: TIS keeps the token with weight C, decoupled drops it.
    """

    weight: OffPolicyWeight = "truncate"
    level: OffPolicyLevel = "token"
    cap: float = 2.0
    reject: OffPolicyReject = "none"
    reject_low: float = 0.5
    reject_high: float = 2.0

    def __post_init__(self):
        check_choice("weight", self.weight, OffPolicyWeight)
        check_choice("level", self.level, OffPolicyLevel)
        check_choice("reject", self.reject, OffPolicyReject)
        if not self.cap >= 1.0:
            raise ValueError(f"cap must be >= 1 (a smaller cap scales down on-policy tokens, ρ = 1), got {self.cap}")
        if not 0.0 <= self.reject_low < 1.0:
            raise ValueError(f"reject_low must be in [0, 1) to keep on-policy tokens (ρ = 1), got {self.reject_low}")
        if not self.reject_high > 1.0:
            raise ValueError(f"reject_high must be > 1 to keep on-policy tokens (ρ = 1), got {self.reject_high}")


def _log(x: float) -> float:
    return -math.inf if x == 0 else math.log(x)


def log_ratio_BxT(prox_logp_BxT, behav_logp_BxT, mask_BxT, level: OffPolicyLevel) -> jax.Array:
    """log ρ_it at ``level`` (see the module docstring), stop-gradient float32, 0 at masked positions."""
    check_choice("level", level, OffPolicyLevel)
    mask = as_mask(mask_BxT)
    prox = jnp.where(mask, as_f32("prox_logp_BxT", prox_logp_BxT, mask.shape), 0.0)
    behav = jnp.where(mask, as_f32("behav_logp_BxT", behav_logp_BxT, mask.shape), 0.0)
    d = sg(prox - behav)
    if level == "token":
        return d
    s_B = jnp.sum(d, axis=1)
    if level == "geometric":
        s_B = s_B / jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.float32), 1.0)
    return jnp.where(mask, s_B[:, None], 0.0)


def correction_terms(
    prox_logp_BxT: jax.Array, behav_logp_BxT: jax.Array, mask_BxT: jax.Array, cfg: OffPolicyConfig
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(weight_BxT, keep_BxT, stats): the stop-gradient multiplier w_it·k_it of token t's policy-gradient term
    (0 where masked or rejected; ρ, w and k as in the module docstring, with C = cfg.cap, lo/hi = cfg.reject_low/high)
    and the keep mask k (bool, within ``mask_BxT``). Stats (merge-able), over rows i with |o_i| > 0:

        mismatch/tokens = Σ m,   mismatch/seqs = #{i: |o_i| > 0},   mismatch/weight_sum = Σ_it w_it·k_it
        mismatch/truncated_tokens_sum = Σ m·1[ρ > C]   (weight='truncate' only: the tokens whose weight is capped)
        mismatch/masked_tokens_sum = Σ m·(1 - k)       (rejected, and for 'decoupled' dropped above the cap)
        mismatch/{truncated,masked}_seqs_sum = #rows with at least one such token

    A row with no valid token has ρ = 1, weight 0 and counts nowhere.
    """
    mask = as_mask(mask_BxT)
    log_rho = log_ratio_BxT(prox_logp_BxT, behav_logp_BxT, mask, cfg.level)
    log_cap = math.log(cfg.cap)
    over_cap = mask & (log_rho > log_cap)
    keep = mask
    if cfg.reject == "mask":
        keep = keep & (log_rho >= _log(cfg.reject_low)) & (log_rho <= math.log(cfg.reject_high))
    if cfg.weight == "decoupled":
        keep = keep & ~over_cap
    w = jnp.ones(mask.shape, jnp.float32) if cfg.weight == "none" else jnp.exp(jnp.minimum(log_rho, log_cap))
    weight = jnp.where(keep, w, 0.0)
    truncated = over_cap if cfg.weight == "truncate" else jnp.zeros_like(mask)
    masked = mask & ~keep
    f32 = jnp.float32
    stats = {
        "mismatch/tokens": jnp.sum(mask, dtype=f32),
        "mismatch/seqs": jnp.sum(jnp.any(mask, axis=1), dtype=f32),
        "mismatch/weight_sum": jnp.sum(weight),
        "mismatch/truncated_tokens_sum": jnp.sum(truncated, dtype=f32),
        "mismatch/truncated_seqs_sum": jnp.sum(jnp.any(truncated, axis=1), dtype=f32),
        "mismatch/masked_tokens_sum": jnp.sum(masked, dtype=f32),
        "mismatch/masked_seqs_sum": jnp.sum(jnp.any(masked, axis=1), dtype=f32),
    }
    return weight, keep, stats


def mismatch_stats(
    trainer_logp_BxT: jax.Array,
    rollout_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    cfg: OffPolicyConfig | None = None,
) -> dict[str, jax.Array]:
    """Merge-able sums of the rollout/trainer mismatch. With d_t = log π(o_t) - log μ(o_t) (π the trainer, μ the
    rollout policy that sampled o_t), r_t = exp(d_t) and m the mask:

        mismatch/abs_logp_diff_sum = Σ m·|d|
        mismatch/kl_k3_sum = Σ m·(r - 1 - log r)    (k3 estimate of KL(μ ‖ π): the samples come from μ)
        mismatch/ratio_max, mismatch/ratio_min = max, min of r over valid tokens
        mismatch/tokens = Σ m,   mismatch/seqs = #rows with a valid token

    In k3 and the ratio extrema, d is bounded to ±LOG_RATIO_BOUND so that one wild token keeps the log finite.
    With ``cfg``, also ``correction_terms``' stats: what that correction would truncate and mask, and its weights.
    """
    mask = as_mask(mask_BxT)
    d = log_ratio_BxT(trainer_logp_BxT, rollout_logp_BxT, mask, "token")
    db = jnp.clip(d, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    r = jnp.exp(db)
    stats = {
        "mismatch/tokens": jnp.sum(mask, dtype=jnp.float32),
        "mismatch/seqs": jnp.sum(jnp.any(mask, axis=1), dtype=jnp.float32),
        "mismatch/abs_logp_diff_sum": jnp.sum(jnp.abs(d)),
        "mismatch/kl_k3_sum": jnp.sum(jnp.where(mask, jnp.expm1(db) - db, 0.0)),
        "mismatch/ratio_max": jnp.max(jnp.where(mask, r, -jnp.inf), initial=-jnp.inf),
        "mismatch/ratio_min": jnp.min(jnp.where(mask, r, jnp.inf), initial=jnp.inf),
    }
    if cfg is not None:
        stats |= correction_terms(trainer_logp_BxT, rollout_logp_BxT, mask, cfg)[2]
    return stats


_PER_TOKEN = {"abs_logp_diff": "abs_logp_diff", "kl_k3": "kl_k3", "weight": "weight_mean",
              "truncated_tokens": "truncated_token_frac", "masked_tokens": "masked_token_frac"}
_PER_SEQ = {"truncated_seqs": "truncated_seq_frac", "masked_seqs": "masked_seq_frac"}


def finalize_mismatch_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Merged ``mismatch/*`` sums -> logged means (each only when its sum is present), n = mismatch/tokens,
    S = mismatch/seqs:

        mismatch/abs_logp_diff, mismatch/kl_k3, mismatch/weight_mean = sum / n
        mismatch/truncated_token_frac, mismatch/masked_token_frac = count / n
        mismatch/truncated_seq_frac, mismatch/masked_seq_frac = rows / S
        mismatch/ratio_max, mismatch/ratio_min (0 when n = 0)
    """
    n, s = stats["mismatch/tokens"], stats["mismatch/seqs"]
    out = {}
    for table, den in ((_PER_TOKEN, n), (_PER_SEQ, s)):
        for key, name in table.items():
            if f"mismatch/{key}_sum" in stats:
                out[f"mismatch/{name}"] = safe_divide(stats[f"mismatch/{key}_sum"], den)
    for key in ("mismatch/ratio_max", "mismatch/ratio_min"):
        if key in stats:
            out[key] = jnp.where(n > 0, stats[key], 0.0)
    return out
