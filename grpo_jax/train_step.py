"""The pure, jitted policy update: (state, batch) -> (state, metrics).

One call runs ``num_iterations`` (μ) optimizer updates on the same rollout batch. Each update splits the batch
into ``micro_batches`` strided micro-batches and accumulates exact gradients: the loss denominator is computed once
from the full batch's masks, each micro-batch contributes grad(numerator_k) / denominator, so the sum equals the
full-batch gradient (never an average of per-micro-batch means).

π_old of the ratio r = π_θ/π_old: the first update of a step is on-policy (π_old = sg(π_θ), r exactly 1). The later
updates of a μ > 1 step use the rollout's log-probs, or, when the objective ``needs_proximal`` (an off-policy
correction that tells the sampler μ from the trainer's policy before the update), the proximal log-probs: those of the
first update's own forward (the params at the start of the step), carried to the later ones, so no extra forward.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from grpo_jax.losses import merge_stats
from grpo_jax.losses.terms import safe_divide
from grpo_jax.models.packed import Plan
from grpo_jax.train_state import TrainState, apply_updates, init_train_state, state_sharding, trained

Stats = dict[str, dict[str, jax.Array]]  # stats groups of an objective, each merged with ``merge_stats``


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    num_iterations: int = 1  # μ: updates per rollout batch
    micro_batches: int = 1
    temperature: float = 1.0  # the rollout's sampling temperature (log-probs of softmax(logits / T))
    logprob_chunk: int = 128
    log_entropy: bool = True
    grad_variance: bool = False  # log the spread of the micro-batch gradient estimates (see make_train_step)
    frozen: Callable | None = None  # nnx filter of params that are not trained (LoRA's base: models.lora.frozen)

    def __post_init__(self):
        if self.num_iterations < 1 or self.micro_batches < 1:
            raise ValueError(
                f"num_iterations and micro_batches must be >= 1, got {self.num_iterations}, {self.micro_batches}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for training log-probs, got {self.temperature}")
        if self.grad_variance and self.micro_batches < 2:
            raise ValueError("grad_variance compares micro-batch gradients; it needs micro_batches >= 2")


class Batch(struct.PyTreeNode):
    """One rollout batch, every array [B, S] over the prompt+completion sequence (S = P + T)."""

    tokens_BxS: jax.Array
    attn_mask_BxS: jax.Array  # real tokens (prompt and completion)
    loss_mask_BxS: jax.Array  # completion tokens that carry loss (EOS included)
    old_logp_BxS: jax.Array  # the sampler's log-probs: π_old when μ > 1, or a correction's behaviour policy
    ref_logp_BxS: jax.Array | None  # None when no reference is needed
    adv: jax.Array  # adv_B or token-level adv_BxS
    old_values_BxS: jax.Array | None = None  # critic algorithms: rollout-time values
    returns_BxS: jax.Array | None = None  # critic algorithms: value targets
    rewards_B: jax.Array | None = None  # paired algorithms: sequence rewards that rank each group's pair
    plan: Plan | None = None  # train.layout packed / shared_prompt: the rows the forward runs (grpo_jax.layout)
    prox_logp_BxS: jax.Array | None = None  # set by the step only (μ > 1, needs_proximal): the params at its start


class Objective(Protocol):
    """What the step needs of an algorithm (``grpo_jax.algorithms.base.Algorithm`` implements it)."""

    contiguous: bool  # micro-batches must hold whole groups
    needs_proximal: bool  # μ > 1: π_old is the trainer's policy at the start of the step, not the rollout's

    def forward(self, model, mb: Batch, *, temperature: float, chunk_size: int, with_entropy: bool): ...
    def denominators(self, batch: Batch) -> dict[str, jax.Array]: ...
    def check_batch(self, rows: int, micro_batches: int) -> None: ...
    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens) -> tuple[jax.Array, Stats]: ...
    def finalize(self, stats: Stats) -> dict[str, jax.Array]: ...


def _micro(x: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...], micro-batch k = rows k, k+m, k+2m, ... (each spread over the batch shards)."""
    if x is None:
        return None
    return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def _micro_contiguous(x: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...], micro-batch k = rows k·B/m ... (k+1)·B/m - 1 (whole groups, for online pairs)."""
    return None if x is None else x.reshape((m, x.shape[0] // m) + x.shape[1:])


def _unmicro(x: jax.Array) -> jax.Array:
    """The inverse of ``_micro``: [m, B/m, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unmicro_contiguous(x: jax.Array) -> jax.Array:
    """The inverse of ``_micro_contiguous``: [m, B/m, ...] -> [B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def contiguous_split(objective: Objective, cfg: StepConfig) -> bool:
    """Whether the step's micro-batches are contiguous rows (whole groups) rather than strided ones."""
    return objective.contiguous or cfg.grad_variance


def _merge(a: Stats, b: Stats) -> Stats:
    return {k: merge_stats(a[k], b[k]) for k in a}


def _old_logp(logp, mb: Batch, on_policy):
    """π_old: sg(logp) on-policy, else the proximal log-probs when the step carries them, else the rollout's. With
    proximal log-probs ``on_policy`` is traced (the μ-scan's first update); else it is a Python bool."""
    current = jax.lax.stop_gradient(logp)
    if mb.prox_logp_BxS is not None:
        return jnp.where(on_policy, current, mb.prox_logp_BxS)
    return current if on_policy else mb.old_logp_BxS


def _micro_loss(params, mb: Batch, dens, on_policy, frozen=None, *, graphdef, objective: Objective,
                cfg: StepConfig):
    """This micro-batch's share of the loss, and (its stats, the token entropy's sum among them; its forward's
    log-probs when the step carries proximal ones, else None). ``params``: the trained ones (all but ``frozen``)."""
    model = nnx.merge(graphdef, params if frozen is None else nnx.merge_state(frozen, params))
    logp, entropy, values = objective.forward(model, mb, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk,
                                              with_entropy=cfg.log_entropy)
    loss, stats = objective.micro_loss(logp, _old_logp(logp, mb, on_policy), values, mb, dens)
    if entropy is not None:
        mask = mb.loss_mask_BxS
        stats["entropy"] = {"entropy_sum": jnp.sum(jnp.where(mask, jax.lax.stop_gradient(entropy), 0.0)),
                            "tokens": jnp.sum(mask, dtype=jnp.float32)}
    current = None if mb.prox_logp_BxS is None else jax.lax.stop_gradient(logp).astype(jnp.float32)
    return loss, (stats, current)


def _gradients(params, batch: Batch, dens, on_policy, frozen, *, loss_fn, split, unsplit, cfg: StepConfig):
    """(loss, stats, grads, Σ_k ||g_k||², logp_BxS) summed over the micro-batches, each contributing
    grad(num_k)/den; logp_BxS: the forward's log-probs when the batch carries proximal ones, else None. Gradients
    of ``params`` only, ``frozen`` (None or the untrained params) held constant."""
    value_and_grad = jax.value_and_grad(functools.partial(loss_fn, frozen=frozen), has_aux=True)
    if cfg.micro_batches == 1:
        (loss, (stats, logp)), grads = value_and_grad(params, batch, dens, on_policy)
        return loss, stats, grads, jnp.zeros((), jnp.float32), logp
    mbs = jax.tree.map(lambda x: split(x, cfg.micro_batches), batch)

    def body(acc, mb):
        (loss_k, (stats_k, logp_k)), g_k = value_and_grad(params, mb, dens, on_policy)
        sq_k = optax.tree.norm(g_k, squared=True) if cfg.grad_variance else jnp.zeros((), jnp.float32)
        if acc is None:
            return (loss_k, stats_k, g_k, sq_k), logp_k
        return (acc[0] + loss_k, _merge(acc[1], stats_k), jax.tree.map(jnp.add, acc[2], g_k), acc[3] + sq_k), logp_k

    first, logp_0 = body(None, jax.tree.map(lambda x: x[0], mbs))
    rest = jax.tree.map(lambda x: x[1:], mbs)
    acc, logp_rest = jax.lax.scan(body, first, rest)
    return (*acc, None if logp_0 is None else unsplit(jnp.concatenate([logp_0[None], logp_rest])))


def _apply(state: TrainState, optimizer, loss, grads, sq_sum, cfg: StepConfig):
    """One optimizer update, refused (the state stays exactly as it was) when the loss or gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    extra = {}
    if cfg.grad_variance:
        K = cfg.micro_batches
        var = jnp.maximum(K * K * sq_sum - K * grad_norm**2, 0.0) / (K - 1)
        extra = {"grad_var": var, "grad_rel_var": var / jnp.maximum(grad_norm**2, 1e-30)}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = apply_updates(state, optimizer, grads, cfg.frozen)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32), **extra}


def _iterations(update, state: TrainState, batch: Batch, dens, *, proximal: bool, cfg: StepConfig):
    """The μ > 1 updates of a step (``update(state, batch, dens, on_policy) -> (state, metrics, logp)``). Metrics
    are their means, but those of the first update for grad_var and mismatch/* (measured against the params at the
    start of the step). With ``proximal``, update 0 is on-policy and its forward's log-probs are π_old of the later
    updates (carried through the scan, so no extra forward); else π_old is the rollout's in every update."""
    if proximal:
        def body(carry, i):
            st, prox = carry
            st, metrics, logp = update(st, batch.replace(prox_logp_BxS=prox), dens, i == 0)
            return (st, jnp.where(i == 0, logp, prox)), metrics

        init = (state, batch.old_logp_BxS.astype(jnp.float32))  # a placeholder of its shape: update 0 ignores it
        (state, _), metrics = jax.lax.scan(body, init, jnp.arange(cfg.num_iterations))
    else:
        state, metrics = jax.lax.scan(lambda st, _: update(st, batch, dens, False)[:2], state, None,
                                      length=cfg.num_iterations)
    first = {k: v[0] for k, v in metrics.items() if k in ("grad_var", "grad_rel_var") or k.startswith("mismatch/")}
    return state, jax.tree.map(jnp.mean, metrics) | first


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: StepConfig,
                    objective: Objective, *, state_sharding=None):
    """The jitted ``train_step(state, batch) -> (state, metrics)`` of ``objective`` for a model of this graphdef.

    ``state_sharding`` (the shardings of the state from ``init_train_state``) pins the output state's placement to
    the input's, so step n+1 sees exactly the shardings step n was compiled for (no recompilation); the input state
    is donated.

    ``cfg.grad_variance``: the K = micro_batches micro-batches are contiguous (whole groups), and with g_k the
    gradient of micro-batch k's share of the loss (so Σ_k g_k = g, the full-batch gradient), e_k = K·g_k is the
    estimate of g from 1/K of the prompts; the step also returns their spread (first update of the step)

        grad_var = (1/(K-1)) Σ_k ||e_k - g||²  =  (K² Σ_k ||g_k||² - K ||g||²) / (K-1),
        grad_rel_var = grad_var / ||g||²
    """
    contiguous = contiguous_split(objective, cfg)
    split, unsplit = (_micro_contiguous, _unmicro_contiguous) if contiguous else (_micro, _unmicro)
    loss_fn = functools.partial(_micro_loss, graphdef=graphdef, objective=objective, cfg=cfg)
    grads_fn = functools.partial(_gradients, loss_fn=loss_fn, split=split, unsplit=unsplit, cfg=cfg)

    def update(state: TrainState, batch: Batch, dens, on_policy):
        fixed, params = trained(state.params, cfg.frozen)
        loss, stats, grads, sq_sum, logp = grads_fn(params, batch, dens, on_policy, fixed)
        new, metrics = _apply(state, optimizer, loss, grads, sq_sum, cfg)
        entropy = stats.pop("entropy", None)
        if entropy is not None:
            metrics["entropy"] = safe_divide(entropy["entropy_sum"], entropy["tokens"])
        return new, objective.finalize(stats) | metrics, logp

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding else None)
    def train_step(state: TrainState, batch: Batch):
        B = batch.tokens_BxS.shape[0]
        if B % cfg.micro_batches:
            raise ValueError(f"batch of {B} rows is not divisible into micro_batches={cfg.micro_batches}")
        objective.check_batch(B, cfg.micro_batches)
        dens = objective.denominators(batch)
        if cfg.num_iterations == 1:  # on-policy: old = sg(current) makes the first ratio exactly 1
            return update(state, batch, dens, on_policy=True)[:2]
        return _iterations(update, state, batch, dens, proximal=objective.needs_proximal, cfg=cfg)

    return train_step


__all__ = ["Batch", "StepConfig", "TrainState", "init_train_state", "make_train_step", "state_sharding"]
