"""Device mesh and the one table that maps logical array axes to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded over it) and
``tensor`` (heads / MLP hidden / vocab split). Modules and batches name their axes logically ('batch',
'embed', 'heads', ...); only ``LOGICAL_AXIS_RULES`` below says where each goes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("classes", None),
    ("lora_rank", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh sizes must be positive with at most one -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
            f"does not match the {len(devices)} devices"
        )
    # Auto axes: jit propagates shardings from the inputs and the annotations (the classic GSPMD mode).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(logical_axes))


def batch_size_multiple(mesh: Mesh) -> int:
    """Number of shards the 'batch' axis is split into; batch sizes must be a multiple of it."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(tree, mesh: Mesh):
    """Place every array of a batch pytree with its leading axis over the batch mesh axes."""

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        if x.shape[0] % batch_size_multiple(mesh):
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the mesh's data*fsdp = {batch_size_multiple(mesh)}"
            )
        return jax.device_put(x, logical_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1)))

    return jax.tree.map(put, tree)


def constrain_batch(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` (activations, leading axis the batch) split over the batch mesh axes of the mesh ``like`` (a param)
    lives on, its other axes whole. Without it, XLA's propagation follows the params: with fsdp > 1 it splits the
    activations along ``embed`` (as the params are split) and gathers the batch on every device. A no-op off a mesh,
    on a mesh without batch sharding, or for a batch its shards do not divide."""
    mesh = jax.typeof(like).sharding.mesh
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    shards = batch_size_multiple(mesh)
    if shards == 1 or x.shape[0] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(("batch",))))


def gather_fsdp(w: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """A param (or a cast of one) all-gathered over ``fsdp`` and still split over ``tensor`` as its rules say: one
    gathered copy that a jitted function's forward and backward share (left to itself XLA gathers the output head
    once for each of them, both live at once). A no-op off a mesh or with fsdp = 1."""
    mesh = jax.typeof(w).sharding.mesh
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return w
    spec = [None if axis == "fsdp" else axis for axis in logical_spec(logical_axes)]
    spec = [axis if axis is None or dim % mesh.shape[axis] == 0 else None for axis, dim in zip(spec, w.shape)]
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(*spec)))


def vocab_split_axes(sizes: Mapping[str, int], vocab_size: int) -> tuple[str, ...] | None:
    """The mesh axes a log-prob head's vocab is split over on a mesh of these axis ``sizes`` (``mesh.shape``, or
    ``grpo_jax.memory``'s): fsdp, then those the rules give vocab; None without fsdp or where they do not divide."""
    if sizes.get("fsdp", 1) == 1:
        return None
    own = logical_spec(("vocab",))[0]
    axes = ("fsdp",) + ((own,) if isinstance(own, str) else tuple(own or ()))
    return axes if vocab_size % int(np.prod([sizes[a] for a in axes])) == 0 else None


def split_vocab(w_ExV: jax.Array) -> jax.Array:
    """The output head [E, V] (a cast of the param) for token log-probs: under fsdp its vocab split over fsdp (and
    over tensor, as the rules split vocab), E whole, so each device projects the rows of its data shard onto its
    slice of the vocabulary (``vocab_rows``). Against gathering the head (``gather_fsdp``), no device holds the whole
    head, XLA:CPU's float32 copy of it or its weight gradient, which is computed already split (at 151,936 x 1,024,
    each of those is 0.3-0.6 GB per device); the rows' hidden states are gathered over fsdp instead. The head
    gathered when the vocab does not divide; a no-op off a mesh or with fsdp = 1."""
    mesh = jax.typeof(w_ExV).sharding.mesh
    axes = vocab_split_axes(mesh.shape, w_ExV.shape[1])
    if axes is None:
        return gather_fsdp(w_ExV, ("embed", "vocab"))
    return jax.lax.with_sharding_constraint(w_ExV, NamedSharding(mesh, PartitionSpec(None, axes)))


def vocab_split(w_ExV: jax.Array) -> bool:
    """Whether ``split_vocab`` splits this head's vocabulary (on its mesh, at its size)."""
    return vocab_split_axes(jax.typeof(w_ExV).sharding.mesh.shape, w_ExV.shape[1]) is not None


def vocab_rows(h_RxE: jax.Array, w_ExV: jax.Array) -> jax.Array:
    """Hidden states [rows, E] for the head ``split_vocab`` gives: split over ``data`` only (every row of a data
    shard on each of its fsdp devices) when the head's vocab is split, else over the batch (``constrain_batch``)."""
    if not vocab_split(w_ExV):
        return constrain_batch(h_RxE, w_ExV)
    mesh = jax.typeof(w_ExV).sharding.mesh
    rows = "data" if h_RxE.shape[0] % mesh.shape["data"] == 0 else None
    return jax.lax.with_sharding_constraint(h_RxE, NamedSharding(mesh, PartitionSpec(rows, None)))


def param_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    """Sharding of one param from its logical axis names; a dimension not divisible by its mesh axes is replicated
    (e.g. 2 kv heads on tensor=4), so any checkpoint loads on any mesh."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match the param's shape {tuple(shape)}")
    spec = tuple(logical_spec(logical_axes)) + (None,) * len(shape)
    fitted = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fitted.append(axes if dim % int(np.prod([mesh.shape[a] for a in names])) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))


def _logical_axes(variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(variable.shape)


def model_shardings(state, mesh: Mesh):
    """NamedSharding for every Variable of an NNX state (concrete or abstract), from its logical axis metadata."""
    return jax.tree.map(
        lambda v: v.replace(param_sharding(mesh, _logical_axes(v), v.shape)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model, mesh: Mesh):
    """Place every param of an NNX model with its logical-axis sharding on ``mesh`` (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, model_shardings(state, mesh)))
    return model
