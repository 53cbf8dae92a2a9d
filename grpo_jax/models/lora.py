"""LoRA adapters on the decoder's projections, as Flax NNX ``nnx.LoRAParam`` variables beside the stacked weights.

A target projection y = x·W (W: [*in, *out]) becomes y = x·W + (α/r)·(x·A)·B with A: [*in, r] and B: [r, *out],
stacked over the layers like W. A starts uniform in ±1/√fan_in and B at 0 (PEFT's default init), so a fresh adapter
leaves the model's outputs exactly as they were. Flax's ``nnx.LoRA`` module wraps one 2-D kernel; ours are stacked
[L, ...] params under ``lax.scan`` with multi-dim in/out axes, so the layers hold ``nnx.LoRAParam`` variables
directly and ``transformer._dense`` adds the low-rank product: the variable type is what separates trainable adapter
from frozen base (the ``frozen`` filter) and what the reference pass leaves out (the adapter off: the same
base arrays under the base model's graphdef, no second copy).

``merged_state`` folds the adapter into W (the merged HF export, and the sampler's weights with
``rollout.merge_lora``); ``save_peft`` writes a PEFT adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the base.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from grpo_jax import storage
from grpo_jax.models.config import LoRAConfig, ModelConfig

# target -> (its weight in LayerStack, number of leading input dims, its HF module under model.layers.{i})
TARGETS: dict[str, tuple[str, int, str]] = {
    "q": ("q", 1, "self_attn.q_proj"), "k": ("k", 1, "self_attn.k_proj"), "v": ("v", 1, "self_attn.v_proj"),
    "o": ("o", 2, "self_attn.o_proj"), "gate": ("gate", 1, "mlp.gate_proj"), "up": ("up", 1, "mlp.up_proj"),
    "down": ("down", 1, "mlp.down_proj"),
}


def add_adapter_params(stack: nnx.Module, cfg: LoRAConfig, axes: dict[str, tuple[str, ...]], rngs: nnx.Rngs) -> None:
    """``{target}_lora_a`` [L, *in, r] and ``{target}_lora_b`` [L, r, *out] on ``stack`` (float32) for each target;
    ``axes``: each target weight's logical axes (with the leading 'layers')."""
    for name in cfg.targets:
        weight, n_in, _ = TARGETS[name]
        shape = getattr(stack, weight).shape
        L, in_shape, out_shape = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (L, *in_shape, cfg.rank), jnp.float32, -bound, bound)
        in_axes, out_axes = axes[weight][1:1 + n_in], axes[weight][1 + n_in:]
        setattr(stack, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=("layers", *in_axes, "lora_rank"),
                                                        eager_sharding=False))
        setattr(stack, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros((L, cfg.rank, *out_shape), jnp.float32),
                                                        out_sharding=("layers", "lora_rank", *out_axes),
                                                        eager_sharding=False))


def adapter(cfg: ModelConfig, layer: nnx.Module, name: str):
    """(A, B, α/r) of one layer's target ``name``, or None when it has no adapter."""
    if cfg.lora is None or name not in cfg.lora.targets:
        return None
    return getattr(layer, f"{name}_lora_a"), getattr(layer, f"{name}_lora_b"), cfg.lora.alpha / cfg.lora.rank


def frozen(path, value) -> bool:
    """The nnx filter of the frozen base weights under LoRA: the policy's own params (``model``/``lm_head``) that
    are not adapters. What an algorithm adds beside them (a value head, a separate critic) trains in full."""
    return isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam) and path[0] in ("model", "lm_head")


def base_state(params: nnx.State) -> nnx.State:
    """The policy's base weights (adapters left out): the same arrays, for the base model's graphdef."""
    return nnx.filter_state(params, frozen)


def attach(policy: nnx.Module, cfg: LoRAConfig, seed: int, mesh) -> nnx.Module:
    """``policy`` with fresh adapters (B = 0: the same outputs) placed on ``mesh`` like their base weights (None:
    left on the default device); the base weights are shared, not copied."""
    from grpo_jax.mesh import shard_model
    from grpo_jax.models.heads import build_model

    model_cfg = dataclasses.replace(policy.config, lora=cfg)
    # only the adapters leave this jit: XLA drops the random init of the base weights
    adapters = jax.jit(lambda: nnx.state(build_model(model_cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam))()
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(seed))))[0]
    model = nnx.merge(graphdef, nnx.merge_state(nnx.state(policy), adapters))
    return model if mesh is None else shard_model(model, mesh)


def merged_state(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The base state with every adapter folded in: W + (α/r)·A·B (float32 product, cast to W's dtype)."""
    base = base_state(params)
    flat = dict(nnx.to_flat_state(params))
    merged = dict(nnx.to_flat_state(base))
    for name in cfg.lora.targets:
        weight, n_in, _ = TARGETS[name]
        w = merged[("model", "layers", weight)]
        a, b = flat[("model", "layers", f"{name}_lora_a")][...], flat[("model", "layers", f"{name}_lora_b")][...]
        L = a.shape[0]
        delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, cfg.lora.rank), b.reshape(L, cfg.lora.rank, -1))
        value = w[...] + (cfg.lora.alpha / cfg.lora.rank) * delta.reshape(w.shape)
        merged[("model", "layers", weight)] = w.replace(value.astype(w[...].dtype))
    return nnx.from_flat_state(merged)


def save_peft(params: nnx.State, cfg: ModelConfig, path: str | os.PathLike, base_model: str) -> None:
    """A PEFT LoRA adapter folder at ``path`` (local or gs://): ``adapter_model.safetensors`` with HF names
    ``base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight`` (A: [r, in], B: [out, r], torch's Linear
    layout) and ``adapter_config.json`` naming ``base_model``."""
    flat = {path_: v[...] for path_, v in nnx.to_flat_state(params)}
    tensors = {}
    for name in cfg.lora.targets:
        _, _, module = TARGETS[name]
        a = np.asarray(jax.device_get(flat[("model", "layers", f"{name}_lora_a")]), np.float32)
        b = np.asarray(jax.device_get(flat[("model", "layers", f"{name}_lora_b")]), np.float32)
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, cfg.lora.rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(cfg.lora.rank, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
              "target_modules": sorted(TARGETS[t][2].split(".")[-1] for t in cfg.lora.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None}
    with storage.staged(path) as local:
        save_file(tensors, os.path.join(local, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(local, "adapter_config.json"), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
