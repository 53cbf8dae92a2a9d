"""What GRPO's two biases act on, measured every step from the training batch (``mech/*`` metrics).

The update is Σ_it w_it ∇log π(o_it) with the effective per-token weight w_it = A_it · ∂agg/∂v_it: the advantage
times what the loss aggregation gives token t of row i (1/(B'·|o_i|) for seq-mean-token-mean, 1/Σ|o| for token-mean,
1/(B'·L) for seq-mean-token-sum-norm; taken by differentiating ``losses.aggregate`` itself, so every mode is exact).

- **Length bias** is a claim about w against |o_i|: with 1/|o_i| a long wrong answer's tokens get a smaller penalty
  each. ``mech/token_weight/{correct,incorrect}_mean`` is the mean of the per-row mean w_it, and
  ``.../{correct,incorrect}_len_slope`` the least-squares slope of that per-row weight against |o_i| (nan with fewer
  than two distinct lengths).
- **Difficulty bias** is a claim about how the update's weight is split between prompts: per difficulty level k,
  ``mech/weight_share/level_k`` = Σ_{i∈k} Σ_t |w_it| / Σ_i Σ_t |w_it| and ``mech/adv_share/level_k`` the same share
  of the per-row |A_i| (mean over the row's tokens for token-level advantages).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.losses import aggregate


def token_weights(adv, loss_mask_BxS, agg: str, norm_len: float | None) -> np.ndarray:
    """w_BxS = A · ∂agg/∂v (0 outside the loss mask); ``adv`` is [B] (per sequence) or [B, S] (per token)."""
    return np.asarray(_token_weights(jnp.asarray(adv, jnp.float32), jnp.asarray(loss_mask_BxS).astype(bool), agg,
                                     norm_len))


@functools.partial(jax.jit, static_argnums=(2, 3))  # one compiled call per step, not a dozen eager ops and a grad
def _token_weights(adv, mask_BxS, agg: str, norm_len: float | None) -> jax.Array:
    d_BxS = jax.grad(lambda v: aggregate(v, mask_BxS, agg, norm_len=norm_len))(jnp.zeros(mask_BxS.shape, jnp.float32))
    a_BxS = adv[:, None] if adv.ndim == 1 else adv
    return jnp.where(mask_BxS, a_BxS * d_BxS, 0.0)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0]) if np.unique(x).size >= 2 else float("nan")


def mechanism_metrics(adv, loss_mask_BxS, agg: str, norm_len: float | None, correct_B, levels_B=None
                      ) -> dict[str, float]:
    """The ``mech/*`` metrics (module docstring) of one training batch. ``correct_B``/``levels_B`` cover the first
    rows (the real ones); rows without loss tokens are left out."""
    mask = np.asarray(loss_mask_BxS).astype(bool)
    w_BxS = token_weights(adv, mask, agg, norm_len)
    n = len(correct_B)
    len_B = mask.sum(1)[:n]
    rows = len_B > 0
    tok_B = w_BxS.sum(1)[:n] / np.maximum(len_B, 1)
    out: dict[str, float] = {}
    correct_B = np.asarray(correct_B, bool)
    for name, sel in (("correct", rows & correct_B), ("incorrect", rows & ~correct_B)):
        out[f"mech/token_weight/{name}_mean"] = float(tok_B[sel].mean()) if sel.any() else float("nan")
        out[f"mech/token_weight/{name}_len_slope"] = _slope(len_B[sel], tok_B[sel]) if sel.any() else float("nan")
    if levels_B is not None:
        a = np.abs(np.asarray(adv, np.float64))
        abs_adv_B = (a if a.ndim == 1 else (a * mask).sum(1) / np.maximum(mask.sum(1), 1))[:n] * rows
        abs_w_B = np.abs(w_BxS).sum(1)[:n]
        levels_B = np.asarray(levels_B)
        for k in np.unique(levels_B):
            sel = levels_B == k
            out[f"mech/weight_share/level_{k}"] = float(abs_w_B[sel].sum() / abs_w_B.sum()) if abs_w_B.sum() else 0.0
            out[f"mech/adv_share/level_{k}"] = float(abs_adv_B[sel].sum() / abs_adv_B.sum()) if abs_adv_B.sum() else 0.0
    return out
