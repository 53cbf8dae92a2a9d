"""Clipped policy-gradient surrogates: GRPO/PPO token ratio, GSPO sequence ratio, CISPO clipped IS weight.

Metrics are kept as token *sums* (``*_sum``, ``tokens``) or extrema (``*_max``, ``*_min``) so micro-batches merge
exactly with ``merge_stats``; ``finalize_stats`` turns them into the logged means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.losses.terms import AggMode, PolicyKind, aggregate, as_f32, as_mask, check_choice, safe_divide

sg = jax.lax.stop_gradient


def _adv_BxT(adv, shape: tuple[int, int]) -> jax.Array:
    adv = as_f32("adv", adv)
    if adv.shape == shape[:1]:
        return jnp.broadcast_to(adv[:, None], shape)
    if adv.shape == shape:
        return adv
    raise ValueError(f"adv has shape {adv.shape}; expected adv_B {shape[:1]} or token-level adv_BxT {shape}")


def policy_loss_terms(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    adv: jax.Array,
    mask_BxT: jax.Array,
    *,
    kind: PolicyKind = "grpo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    weight_BxT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token policy loss ``loss_BxT`` (masked positions 0) and merge-able stats; see ``policy_loss``. With
    ``weight_BxT`` (e.g. ``correction_terms``' off-policy weights) ℓ_it <- sg(w_it)·ℓ_it after the clip and dual
    clip; the stats (clip fractions, ratios) stay over every valid token."""
    check_choice("kind", kind, PolicyKind)
    if not clip_low > 0:
        raise ValueError(f"clip_low must be > 0, got {clip_low}")
    if dual_clip is not None and (kind == "cispo" or not dual_clip > 1):
        raise ValueError(f"dual_clip must be > 1 and applies to kind 'grpo'/'gspo'; got {dual_clip} with kind={kind!r}")
    mask = as_mask(mask_BxT)
    shape = mask.shape
    logp = jnp.where(mask, as_f32("logp_BxT", logp_BxT, shape), 0.0)
    old = jnp.where(mask, as_f32("old_logp_BxT", old_logp_BxT, shape), 0.0)
    A = _adv_BxT(adv, shape)
    lo, hi = 1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high)

    if kind == "gspo":
        len_B = jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.float32), 1.0)
        s_B = jnp.exp(jnp.sum(logp - old, axis=1) / len_B)
        ratio = sg(s_B)[:, None] * jnp.exp(logp - sg(logp))
    else:
        ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, lo, hi)
    if kind == "cispo":
        loss = -sg(clipped) * A * logp
        low, high = ratio < lo, ratio > hi
    else:
        loss = jnp.maximum(-ratio * A, -clipped * A)
        low, high = (A < 0) & (ratio < lo), (A > 0) & (ratio > hi)
    stats = {}
    if dual_clip is not None:
        dual = (A < 0) & (loss > -dual_clip * A)
        loss = jnp.where(dual, -dual_clip * A, loss)
        stats["dual_clip_sum"] = jnp.sum(dual & mask, dtype=jnp.float32)
    if weight_BxT is not None:
        loss = loss * sg(jnp.where(mask, as_f32("weight_BxT", weight_BxT, shape), 0.0))
    loss = jnp.where(mask, loss, 0.0)
    r = sg(ratio)
    stats |= {
        "tokens": jnp.sum(mask, dtype=jnp.float32),
        "clip_low_sum": jnp.sum(low & mask, dtype=jnp.float32),
        "clip_high_sum": jnp.sum(high & mask, dtype=jnp.float32),
        "ratio_sum": jnp.sum(jnp.where(mask, r, 0.0)),
        "ratio_max": jnp.max(jnp.where(mask, r, -jnp.inf), initial=-jnp.inf),
        "ratio_min": jnp.min(jnp.where(mask, r, jnp.inf), initial=jnp.inf),
    }
    return loss, stats


def merge_stats(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine the stats of two micro-batches: sums add, ``*_max``/``*_min`` take the extreme."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot merge stats with keys {sorted(a)} and {sorted(b)}")
    pick = {"max": jnp.maximum, "min": jnp.minimum}
    return {k: pick.get(k.rsplit("_", 1)[-1], jnp.add)(a[k], b[k]) for k in a}


def finalize_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token sums -> means (``clip_frac`` = fraction of valid tokens whose clipped branch is active)."""
    n = stats["tokens"]
    out = {
        "clip_frac": safe_divide(stats["clip_low_sum"] + stats["clip_high_sum"], n),
        "clip_frac_low": safe_divide(stats["clip_low_sum"], n),
        "clip_frac_high": safe_divide(stats["clip_high_sum"], n),
        "ratio_mean": safe_divide(stats["ratio_sum"], n),
        "ratio_max": jnp.where(n > 0, stats["ratio_max"], 0.0),
        "ratio_min": jnp.where(n > 0, stats["ratio_min"], 0.0),
    }
    for k in stats:
        if k.endswith("_sum") and k.removesuffix("_sum") not in ("clip_low", "clip_high", "ratio"):
            out[k.removesuffix("_sum")] = safe_divide(stats[k], n)
    return out


def policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    adv: jax.Array,
    mask_BxT: jax.Array,
    *,
    kind: PolicyKind = "grpo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    norm_len: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate loss, aggregated with ``agg`` (see ``aggregate_parts``). With ε_lo = clip_low,
    ε_hi = clip_high or clip_low, A the advantage (``adv_B`` per sequence or token-level ``adv_BxT``):

    kind="grpo" (PPO clip, Schulman et al. 2017; clip-higher from DAPO):
        r_it = exp(logp_it - old_it),   ℓ_it = -min(r_it·A, clip(r_it, 1-ε_lo, 1+ε_hi)·A)
    dual_clip=c > 1 (Ye et al. 2020): for A < 0, ℓ_it = min(ℓ_it, -c·A).
    kind="gspo" (Zheng et al. 2025, GSPO-token): s_i = exp((1/|o_i|) Σ_t (logp_it - old_it)),
        r_it = sg(s_i)·exp(logp_it - sg(logp_it)) (value s_i, gradient s_i·∇logp_it), clipped as above.
    kind="cispo" (MiniMax-M1, 2025): ℓ_it = -sg(clip(r_it, 1-ε_lo, 1+ε_hi))·A·logp_it.

    Returns (loss, metrics) with clip_frac (fraction of valid tokens whose clipped branch is active: the ratio is
    out of range on the side the advantage's sign makes binding; for cispo, any clipped weight), clip_frac_low/high,
    ratio_mean/max/min, and dual_clip (fraction of tokens capped) when dual_clip is set.
    """
    loss_BxT, stats = policy_loss_terms(
        logp_BxT, old_logp_BxT, adv, mask_BxT, kind=kind, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    return aggregate(loss_BxT, mask_BxT, agg, norm_len=norm_len), finalize_stats(stats)
