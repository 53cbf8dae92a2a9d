"""The pure, jitted policy update: (state, batch) -> (state, metrics).

One call runs ``num_iterations`` (μ) optimizer updates on the same rollout batch. Each update splits the batch
into ``micro_batches`` strided micro-batches and accumulates exact gradients: the loss denominator is computed once
from the full batch's masks, each micro-batch contributes grad(numerator_k) / denominator, so the sum equals the
full-batch gradient (never an average of per-micro-batch means).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from grpo_jax.losses import merge_stats
from grpo_jax.losses.terms import safe_divide
from grpo_jax.models.packed import Plan

Stats = dict[str, dict[str, jax.Array]]  # stats groups of an objective, each merged with ``merge_stats``


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    num_iterations: int = 1  # μ: updates per rollout batch
    micro_batches: int = 1
    temperature: float = 1.0  # the rollout's sampling temperature (log-probs of softmax(logits / T))
    logprob_chunk: int = 128
    log_entropy: bool = True
    grad_variance: bool = False  # log the spread of the micro-batch gradient estimates (see make_train_step)

    def __post_init__(self):
        if self.num_iterations < 1 or self.micro_batches < 1:
            raise ValueError(
                f"num_iterations and micro_batches must be >= 1, got {self.num_iterations}, {self.micro_batches}")
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
    ref_logp_BxS: jax.Array | None  # None when no reference is needed
    adv: jax.Array  # adv_B or token-level adv_BxS
    old_values_BxS: jax.Array | None = None  # critic algorithms: rollout-time values
    returns_BxS: jax.Array | None = None  # critic algorithms: value targets
    rewards_B: jax.Array | None = None  # paired algorithms: sequence rewards that rank each group's pair
    plan: Plan | None = None  # train.layout packed / shared_prompt: the rows the forward runs (grpo_jax.layout)


class Objective(Protocol):
    """What the step needs of an algorithm (``grpo_jax.algorithms.base.Algorithm`` implements it)."""

    contiguous: bool  # micro-batches must hold whole groups

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


def contiguous_split(objective: Objective, cfg: StepConfig) -> bool:
    """Whether the step's micro-batches are contiguous rows (whole groups) rather than strided ones."""
    return objective.contiguous or cfg.grad_variance


def _merge(a: Stats, b: Stats) -> Stats:
    return {k: merge_stats(a[k], b[k]) for k in a}


def _micro_loss(params, mb: Batch, dens, on_policy: bool, *, graphdef, objective: Objective, cfg: StepConfig):
    """This micro-batch's share of the loss (and its stats, the token entropy's sum among them)."""
    model = nnx.merge(graphdef, params)
    logp, entropy, values = objective.forward(model, mb, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk,
                                              with_entropy=cfg.log_entropy)
    old = jax.lax.stop_gradient(logp) if on_policy else mb.old_logp_BxS
    loss, stats = objective.micro_loss(logp, old, values, mb, dens)
    if entropy is not None:
        mask = mb.loss_mask_BxS
        stats["entropy"] = {"entropy_sum": jnp.sum(jnp.where(mask, jax.lax.stop_gradient(entropy), 0.0)),
                            "tokens": jnp.sum(mask, dtype=jnp.float32)}
    return loss, stats


def _gradients(params, batch: Batch, dens, on_policy: bool, *, loss_fn, split, cfg: StepConfig):
    """(loss, stats, grads, Σ_k ||g_k||²) summed over the micro-batches, each contributing grad(num_k)/den."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.micro_batches == 1:
        (loss, stats), grads = value_and_grad(params, batch, dens, on_policy)
        return loss, stats, grads, jnp.zeros((), jnp.float32)
    mbs = jax.tree.map(lambda x: split(x, cfg.micro_batches), batch)

    def body(acc, mb):
        (loss_k, stats_k), g_k = value_and_grad(params, mb, dens, on_policy)
        sq_k = optax.tree.norm(g_k, squared=True) if cfg.grad_variance else jnp.zeros((), jnp.float32)
        if acc is None:
            return (loss_k, stats_k, g_k, sq_k)
        return (acc[0] + loss_k, _merge(acc[1], stats_k), jax.tree.map(jnp.add, acc[2], g_k), acc[3] + sq_k)

    first = body(None, jax.tree.map(lambda x: x[0], mbs))
    rest = jax.tree.map(lambda x: x[1:], mbs)
    return jax.lax.scan(lambda acc, mb: (body(acc, mb), None), first, rest)[0]


def _apply(state: TrainState, optimizer, loss, grads, sq_sum, cfg: StepConfig):
    """One optimizer update, refused (the state stays exactly as it was) when the loss or gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    extra = {}
    if cfg.grad_variance:
        K = cfg.micro_batches
        var = jnp.maximum(K * K * sq_sum - K * grad_norm**2, 0.0) / (K - 1)
        extra = {"grad_var": var, "grad_rel_var": var / jnp.maximum(grad_norm**2, 1e-30)}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32), **extra}


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
    split = _micro_contiguous if contiguous_split(objective, cfg) else _micro
    loss_fn = functools.partial(_micro_loss, graphdef=graphdef, objective=objective, cfg=cfg)
    grads_fn = functools.partial(_gradients, loss_fn=loss_fn, split=split, cfg=cfg)

    def update(state: TrainState, batch: Batch, dens, on_policy: bool):
        loss, stats, grads, sq_sum = grads_fn(state.params, batch, dens, on_policy)
        new, metrics = _apply(state, optimizer, loss, grads, sq_sum, cfg)
        entropy = stats.pop("entropy", None)
        if entropy is not None:
            metrics["entropy"] = safe_divide(entropy["entropy_sum"], entropy["tokens"])
        return new, objective.finalize(stats) | metrics

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding else None)
    def train_step(state: TrainState, batch: Batch):
        B = batch.tokens_BxS.shape[0]
        if B % cfg.micro_batches:
            raise ValueError(f"batch of {B} rows is not divisible into micro_batches={cfg.micro_batches}")
        objective.check_batch(B, cfg.micro_batches)
        dens = objective.denominators(batch)
        if cfg.num_iterations == 1:  # on-policy: old = sg(current) makes the first ratio exactly 1
            return update(state, batch, dens, on_policy=True)
        state, metrics = jax.lax.scan(lambda st, _: update(st, batch, dens, on_policy=False), state, None,
                                      length=cfg.num_iterations)
        first = {k: metrics[k][0] for k in ("grad_var", "grad_rel_var") if k in metrics}
        return state, jax.tree.map(jnp.mean, metrics) | first

    return train_step


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 state: the optimizer's per-param leaves (AdamW's moments) placed exactly like their params (sharded
    over fsdp/tensor as the params are: left to itself XLA replicates them), its other leaves (counts) replicated
    on the params' mesh. Pass ``state_sharding(state)`` to ``make_train_step``."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), shardings,
                                          transform_non_params=lambda _: replicated,
                                          is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    out = TrainState(step=replicated, params=shardings, opt_state=opt_shardings)
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)),
                   out_shardings=out)
    return init(params)


def state_sharding(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)
