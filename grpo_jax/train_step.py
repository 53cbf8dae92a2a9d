"""The pure, jitted policy update: (state, batch) -> (state, metrics).

One call runs ``num_iterations`` (μ) optimizer updates on the same rollout batch. Each update splits the batch
into ``micro_batches`` strided micro-batches and accumulates exact gradients: the loss denominator is computed once
from the full batch's masks, each micro-batch contributes grad(numerator_k) / denominator, so the sum equals the
full-batch gradient (never an average of per-micro-batch means).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from grpo_jax import objectives
from grpo_jax.critic import logprobs_and_values
from grpo_jax.losses import DPOConfig, LossConfig, PPOConfig
from grpo_jax.models import token_logprobs
from grpo_jax.objectives import PAIRED, AlgoKind


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; choose one of ['constant', 'cosine']")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) with linear warmup, then constant or cosine decay to 0 at ``total_updates``,
    after global-norm gradient clipping."""
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(total_updates, cfg.warmup_steps + 1))
    elif cfg.warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
                                  [cfg.warmup_steps])
    else:
        lr = optax.constant_schedule(cfg.lr)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*clip, adamw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    loss: LossConfig
    num_iterations: int = 1  # μ: updates per rollout batch
    micro_batches: int = 1
    temperature: float = 1.0  # the rollout's sampling temperature (log-probs of softmax(logits / T))
    logprob_chunk: int = 128
    log_entropy: bool = True
    kind: AlgoKind = "grpo"  # see grpo_jax.objectives
    ppo: PPOConfig | None = None  # kind ppo: the policy needs a value head (grpo_jax.critic.add_value_head)
    dpo: DPOConfig | None = None  # kind dpo / hybrid
    group_size: int | None = None  # kind dpo / hybrid: rows of one rollout group are contiguous
    grad_variance: bool = False  # log the spread of the micro-batch gradient estimates (see make_train_step)

    def __post_init__(self):
        if self.num_iterations < 1 or self.micro_batches < 1:
            raise ValueError(f"num_iterations and micro_batches must be >= 1, got {self.num_iterations}, {self.micro_batches}")
        if self.kind == "ppo" and self.ppo is None:
            raise ValueError("kind='ppo' needs ppo (a PPOConfig)")
        if self.kind in PAIRED and (self.dpo is None or self.group_size is None or self.group_size < 2):
            raise ValueError(f"kind={self.kind!r} needs dpo (a DPOConfig) and group_size >= 2, got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for training log-probs, got {self.temperature}")
        if self.grad_variance and self.micro_batches < 2:
            raise ValueError("grad_variance compares micro-batch gradients; it needs micro_batches >= 2")


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


class Batch(struct.PyTreeNode):
    """One rollout batch, every array [B, S] over the prompt+completion sequence (S = P + T)."""

    tokens_BxS: jax.Array
    attn_mask_BxS: jax.Array  # real tokens (prompt and completion)
    loss_mask_BxS: jax.Array  # completion tokens that carry loss (EOS included)
    old_logp_BxS: jax.Array  # rollout log-probs (used when μ > 1)
    ref_logp_BxS: jax.Array | None  # None when β = 0
    adv: jax.Array  # adv_B or token-level adv_BxS
    old_values_BxS: jax.Array | None = None  # kind ppo: rollout-time critic values
    returns_BxS: jax.Array | None = None  # kind ppo: GAE returns (value targets)
    rewards_B: jax.Array | None = None  # kind dpo / hybrid: sequence rewards that rank each group's pair


def _micro(x: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...], micro-batch k = rows k, k+m, k+2m, ... (each spread over the batch shards)."""
    if x is None:
        return None
    return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def _micro_contiguous(x: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...], micro-batch k = rows k·B/m ... (k+1)·B/m - 1 (whole groups, for online pairs)."""
    return None if x is None else x.reshape((m, x.shape[0] // m) + x.shape[1:])


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: StepConfig, *,
                    state_sharding=None):
    """The jitted ``train_step(state, batch) -> (state, metrics)`` for a model of this graphdef.

    ``state_sharding`` (the shardings of the state from ``init_train_state``) pins the output state's placement to
    the input's, so step n+1 sees exactly the shardings step n was compiled for (no recompilation); the input state
    is donated.

    ``cfg.grad_variance``: the K = micro_batches micro-batches are contiguous (whole groups), and with g_k the
    gradient of micro-batch k's share of the loss (so Σ_k g_k = g, the full-batch gradient), e_k = K·g_k is the
    estimate of g from 1/K of the prompts; the step also returns their spread (first update of the step)

        grad_var = (1/(K-1)) Σ_k ||e_k - g||²  =  (K² Σ_k ||g_k||² - K ||g||²) / (K-1),   grad_rel_var = grad_var / ||g||²
    """
    loss_cfg = cfg.loss
    split = _micro_contiguous if cfg.kind in PAIRED or cfg.grad_variance else _micro

    def logps(params, mb: Batch, with_entropy: bool):
        """(logp, entropy or None, values or None) from one decoder pass."""
        model = nnx.merge(graphdef, params)
        kw = dict(temperature=cfg.temperature, return_entropy=with_entropy, chunk_size=cfg.logprob_chunk)
        if cfg.kind == "ppo":
            return logprobs_and_values(model, mb.tokens_BxS, mb.attn_mask_BxS, **kw)
        out = token_logprobs(model, mb.tokens_BxS, mb.attn_mask_BxS, **kw)
        return (out if with_entropy else (out, None)) + (None,)

    def micro_loss(params, mb: Batch, dens, on_policy: bool):
        logp, entropy, values = logps(params, mb, cfg.log_entropy)
        old = jax.lax.stop_gradient(logp) if on_policy else mb.old_logp_BxS
        loss, stats = objectives.micro_objective(cfg.kind, loss_cfg, cfg.ppo, cfg.dpo, cfg.group_size, logp, old,
                                                 values, mb, dens)
        if entropy is not None:
            stats["pg"]["entropy_sum"] = jnp.sum(jnp.where(mb.loss_mask_BxS, jax.lax.stop_gradient(entropy), 0.0))
        return loss, stats

    def update(state: TrainState, batch: Batch, den, on_policy: bool):
        if cfg.micro_batches == 1:
            (loss, stats), grads = jax.value_and_grad(micro_loss, has_aux=True)(state.params, batch, den, on_policy)
        else:
            mbs = jax.tree.map(lambda x: split(x, cfg.micro_batches), batch)

            def body(acc, mb):
                (loss_k, stats_k), g_k = jax.value_and_grad(micro_loss, has_aux=True)(state.params, mb, den, on_policy)
                sq_k = optax.tree.norm(g_k, squared=True) if cfg.grad_variance else jnp.zeros((), jnp.float32)
                if acc is None:
                    return (loss_k, stats_k, g_k, sq_k)
                return (acc[0] + loss_k, objectives.merge(acc[1], stats_k), jax.tree.map(jnp.add, acc[2], g_k),
                        acc[3] + sq_k)

            first = body(None, jax.tree.map(lambda x: x[0], mbs))
            rest = jax.tree.map(lambda x: x[1:], mbs)
            (loss, stats, grads, sq_sum), _ = jax.lax.scan(lambda acc, mb: (body(acc, mb), None), first, rest)
        grad_norm = optax.tree.norm(grads)
        extra = {}
        if cfg.grad_variance:
            K = cfg.micro_batches
            var = jnp.maximum(K * K * sq_sum - K * grad_norm**2, 0.0) / (K - 1)
            extra = {"grad_var": var, "grad_rel_var": var / jnp.maximum(grad_norm**2, 1e-30)}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        # a non-finite loss or gradient refuses the update: the state stays exactly as it was
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = objectives.finalize(cfg.kind, stats)
        metrics |= {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32), **extra}
        return new, metrics  # entropy_sum -> entropy (token mean) in objectives.finalize

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding else None)
    def train_step(state: TrainState, batch: Batch):
        B = batch.tokens_BxS.shape[0]
        if B % cfg.micro_batches:
            raise ValueError(f"batch of {B} rows is not divisible into micro_batches={cfg.micro_batches}")
        if cfg.kind in PAIRED and (B // cfg.micro_batches) % cfg.group_size:
            raise ValueError(f"kind={cfg.kind}: micro-batches of {B // cfg.micro_batches} rows must hold whole groups "
                             f"of group_size={cfg.group_size} (online pairs are formed inside a micro-batch)")
        den = objectives.denominators(cfg.kind, loss_cfg, batch, cfg.group_size)
        if cfg.num_iterations == 1:  # on-policy: old = sg(current) makes the first ratio exactly 1
            return update(state, batch, den, on_policy=True)

        def iteration(st, _):
            return update(st, batch, den, on_policy=False)

        state, metrics = jax.lax.scan(iteration, state, None, length=cfg.num_iterations)
        first = {k: metrics[k][0] for k in ("grad_var", "grad_rel_var") if k in metrics}
        return state, jax.tree.map(jnp.mean, metrics) | first

    return train_step


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 state, built under jit so every leaf (optimizer moments included) gets a sharding derived from the
    params' (pass ``state_sharding(state)`` to ``make_train_step``)."""
    return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)))(params)


def state_sharding(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)
