"""The train state (params, optimizer state, an optional float32 master copy) and one optimizer update of it.

Under LoRA only the adapters (and what an algorithm adds beside the policy) are trained: the ``frozen`` filter
(``models.lora.frozen``) leaves the base weights out of the gradients, the optimizer state and the master copy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec


class TrainState(struct.PyTreeNode):
    """``master``: float32 copies of lower-precision params (``model.master_weights``), which the optimizer updates
    (its moments are float32 too) and whose rounding the params are; None when the params are the master weights."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    master: nnx.State | None = None


def trained(params: nnx.State, frozen) -> tuple[nnx.State | None, nnx.State]:
    """(the ``frozen`` params or None, the trained rest)."""
    return (None, params) if frozen is None else nnx.filter_state(params, frozen, ...)


def apply_updates(state: TrainState, optimizer, grads, frozen=None) -> TrainState:
    """``state`` after one optimizer update of its trained params with their ``grads``. With a master copy the
    float32 gradients update it and the params become its rounding, so an update far below the params' resolution
    still accumulates."""
    fixed, params = trained(state.params, frozen)
    master = state.master
    if master is None:
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
    else:
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, master)
        master = optax.apply_updates(master, updates)
        params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
    params = params if fixed is None else nnx.merge_state(fixed, params)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, master=master)


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation, *,
                     master: bool = False, frozen=None) -> TrainState:
    """Step 0 state: the optimizer's per-param leaves (AdamW's moments) placed exactly like their params (sharded
    over fsdp/tensor as the params are: left to itself XLA replicates them), its other leaves (counts) replicated
    on the params' mesh. ``master``: keep float32 master copies of the params (TrainState's docstring), from which
    the moments take their float32 dtype. ``frozen``: the nnx filter of params that are not trained (no moments,
    no master copy). Pass ``state_sharding(state)`` to ``make_train_step``."""
    full, params = params, trained(params, frozen)[1]
    full_shardings = jax.tree.map(lambda x: x.sharding, full)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    masked = optax.transforms._masking.MaskedNode  # a param another part of a multi_transform optimizer owns
    to_master = (lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p)) if master else (lambda p: None)
    opt_params = jax.eval_shape(to_master, params) if master else params
    opt_shardings = optax.tree_map_params(optimizer, lambda p, s: p if isinstance(p, masked) else s,
                                          jax.eval_shape(optimizer.init, opt_params), shardings,
                                          transform_non_params=lambda _: replicated,
                                          is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, masked)))
    out = TrainState(step=replicated, params=full_shardings, opt_state=opt_shardings,
                     master=shardings if master else None)

    def init(full):
        p = trained(full, frozen)[1]
        m = to_master(p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=full, opt_state=optimizer.init(p if m is None else m),
                          master=m)

    return jax.jit(init, out_shardings=out)(full)


def state_sharding(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)
