"""Per-token loss terms, KL estimators and aggregation (pure JAX).

Shapes: B sequences x T completion tokens. ``mask_BxT`` marks real completion tokens (bool, or 0/1 numbers).
Every term is a per-token array; ``aggregate_parts`` reduces it to a (numerator, denominator) pair whose
denominator depends only on the mask, so summing the pairs over micro-batches and dividing once gives exactly the
full-batch loss and gradient. Inputs may be bfloat16; all arithmetic and results are float32. Values at masked
positions are replaced by 0 before any arithmetic, so padding (even -inf log-probs) never yields NaN values or
gradients.
"""
from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]
PolicyKind = Literal["grpo", "gspo", "cispo"]


def check_choice(name: str, value, allowed_type) -> None:
    allowed = get_args(allowed_type)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def as_f32(name: str, x, shape: tuple[int, ...] | None = None) -> jax.Array:
    """``x`` as float32, checking it is floating point and (optionally) of ``shape``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")
    return x.astype(jnp.float32)


def as_mask(mask_BxT, shape: tuple[int, ...] | None = None) -> jax.Array:
    mask_BxT = jnp.asarray(mask_BxT)
    if mask_BxT.ndim != 2:
        raise ValueError(f"mask_BxT must be 2-D (B, T), got shape {mask_BxT.shape}")
    if shape is not None and mask_BxT.shape != shape:
        raise ValueError(f"mask_BxT has shape {mask_BxT.shape}, expected {shape}")
    return mask_BxT if mask_BxT.dtype == jnp.bool_ else mask_BxT != 0


def kl_penalty(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, kind: KLKind = "k3") -> jax.Array:
    """Per-token estimators of KL(π_θ || π_ref) from samples of π_θ (Schulman, "Approximating KL divergence").

    With d = ref_logp - logp:  k1 = -d = logp - ref_logp;  k2 = d² / 2;  k3 = exp(d) - d - 1  (>= 0, unbiased;
    GRPO's choice). Exact formulas, no clamping. Returns float32 of the input shape.
    """
    check_choice("kind", kind, KLKind)
    logp = as_f32("logp_BxT", logp_BxT)
    d = as_f32("ref_logp_BxT", ref_logp_BxT, logp.shape) - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return jnp.expm1(d) - d


def aggregate_parts(
    values_BxT: jax.Array, mask_BxT: jax.Array, mode: AggMode, *, norm_len: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) with ``aggregate = numerator / denominator``; the denominator depends only on the
    mask. With v the values, m the mask, |o_i| = Σ_t m_it and B' the number of rows with |o_i| > 0:

        token-mean               Σ_it v·m / Σ_it m                      (DAPO, token-level)
        seq-mean-token-mean      (1/B') Σ_i (1/|o_i|) Σ_t v·m            (GRPO, DeepSeekMath)
        seq-mean-token-sum       (1/B') Σ_i Σ_t v·m
        seq-mean-token-sum-norm  Σ_it v·m / (B'·norm_len)               (Dr. GRPO, constant norm)

    Rows with no valid token add nothing to either part, so padding rows never change the loss.
    """
    check_choice("mode", mode, AggMode)
    mask = as_mask(mask_BxT)
    v = jnp.where(mask, as_f32("values_BxT", values_BxT, mask.shape), 0.0)
    len_B = jnp.sum(mask, axis=1, dtype=jnp.float32)
    rows = jnp.sum(len_B > 0, dtype=jnp.float32)
    if mode == "token-mean":
        return jnp.sum(v), jnp.sum(len_B)
    if mode == "seq-mean-token-mean":
        return jnp.sum(jnp.sum(v, axis=1) / jnp.maximum(len_B, 1.0)), rows
    if mode == "seq-mean-token-sum":
        return jnp.sum(v), rows
    if norm_len is None or not norm_len > 0:
        raise ValueError(
            f"mode='seq-mean-token-sum-norm' needs a positive norm_len (e.g. max_new_tokens), got {norm_len!r}")
    return jnp.sum(v), rows * norm_len


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (an all-padding batch), with finite gradients."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def aggregate(values_BxT: jax.Array, mask_BxT: jax.Array, mode: AggMode, *, norm_len: float | None = None) -> jax.Array:
    """Scalar loss from per-token values; see ``aggregate_parts`` for the modes. 0 when nothing is valid."""
    return safe_divide(*aggregate_parts(values_BxT, mask_BxT, mode, norm_len=norm_len))


def masked_mean(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    return aggregate(values_BxT, mask_BxT, "token-mean")
