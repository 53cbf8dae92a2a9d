"""The one optimizer builder, for RL and SFT alike: AdamW with a learning-rate schedule, global-norm clipping and a
weight-decay mask.

    g ← g · min(1, max_grad_norm / ‖g‖₂)                           (clipping, ‖·‖₂ over all params together)
    m ← b1·m + (1-b1)·g,  v ← b2·v + (1-b2)·g²,  m̂ = m/(1-b1ᵗ),  v̂ = v/(1-b2ᵗ)
    θ ← θ - lr(t−1) · (m̂ / (√v̂ + eps) + weight_decay · mask(θ) · θ)   (decoupled decay, Loshchilov & Hutter)

``lr(s)`` for update s = 0, 1, ... (``make_schedule``): a linear warmup lr·s/warmup_steps over the first
``warmup_steps`` updates, then ``constant`` lr or ``cosine`` lr·½(1 + cos(π·(s - warmup)/(total - warmup))), which
reaches 0 at ``total_updates``.

``mask(θ)`` (``decays``) is 1 for weight matrices and embeddings and 0 for RMSNorm scales (param names ending in
``norm``: attn_norm, mlp_norm, q_norm, k_norm, the final norm) and biases (names ending in ``bias``: q/k/v/o/gate/
up/down_bias, and the value head's ``b``): decaying a norm scale towards 0 or a bias towards 0 is not a
regulariser, just a pull on the layer's output. The rule reads names, not shapes: the decoder's params are stacked
over a leading [L] axis and q/k/v biases are [N, H], so "ndim >= 2" would decay biases and norm scales.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0  # on weight matrices and embeddings only (see ``decays``)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; choose one of ['constant', 'cosine']")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def make_schedule(cfg: OptimConfig, total_updates: int) -> optax.Schedule:
    """lr(s) for update s = 0, 1, ...: linear warmup from 0 over ``warmup_steps``, then constant, or cosine decay to
    0 at ``total_updates`` (at least ``warmup_steps + 1``)."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                                  max(total_updates, cfg.warmup_steps + 1))
    if cfg.warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def decays(name: str) -> bool:
    """Whether weight decay applies to the param called ``name`` (its last key in the param tree): not to norm
    scales (``*norm``) nor biases (``*bias``, the value head's ``b``)."""
    return not (name.endswith("norm") or name.endswith("bias") or name == "b")


def decay_mask(params):
    """``params``' tree with True where weight decay applies (``decays`` of each leaf's last dict key; a leaf with
    no dict key in its path, e.g. a bare array, is decayed)."""

    def leaf(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return decays(str(names[-1])) if names else True

    return jax.tree_util.tree_map_with_path(leaf, params)


def critic_labels(params):
    """``params``' tree labelled ``critic`` under the top-level ``critic`` key (PPO's separate value model), else
    ``policy``."""

    def leaf(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return "critic" if names and names[0] == "critic" else "policy"

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(cfg: OptimConfig, total_updates: int, *,
                   critic: OptimConfig | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (unless ``max_grad_norm`` is None), then AdamW at ``make_schedule(cfg, total_updates)``
    with weight decay masked by ``decay_mask`` (formulas in the module docstring). With ``critic``, the params under
    ``critic`` (``critic_labels``) get an optimizer of their own built from it: their own clipping norm, moments and
    learning rate."""
    if critic is not None:
        return optax.multi_transform({"policy": make_optimizer(cfg, total_updates),
                                      "critic": make_optimizer(critic, total_updates)}, critic_labels)
    adamw = optax.adamw(make_schedule(cfg, total_updates), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*clip, adamw)
