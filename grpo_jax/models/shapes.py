"""The params of ``CausalLM`` (models/transformer.py, heads.py) as (logical axes, shape) rows, layers stacked: what
``grpo_jax.memory`` sizes and shards without building a model."""
from __future__ import annotations

import math

from grpo_jax.models.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(logical axes, shape) of every param of ``CausalLM`` (models/transformer.py, heads.py), layers stacked."""
    L, E, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size)
    q, kv, o = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"), ("heads", "head_dim", "embed")
    layer = [(("norm",), (E,)), (q, (E, N, H)), (kv, (E, K, H)), (kv, (E, K, H)), (o, (N, H, E)), (("norm",), (E,)),
             (("embed", "mlp"), (E, F)), (("embed", "mlp"), (E, F)), (("mlp", "embed"), (F, E))]
    bias_kv = (("kv_heads", "head_dim"), (K, H))
    layer += [(("heads", "head_dim"), (N, H)), bias_kv, bias_kv] * cfg.qkv_bias
    layer += [(("embed",), (E,))] * (cfg.o_bias + cfg.mlp_bias) + [(("mlp",), (F,))] * 2 * cfg.mlp_bias
    layer += [(("norm",), (H,))] * 2 * cfg.qk_norm
    head = [] if cfg.tie_word_embeddings else [(("embed", "vocab"), (E, V))]
    return [(("vocab", "embed"), (V, E)), (("norm",), (E,))] + head + [(("layers",) + a, (L,) + s) for a, s in layer]


def adapter_shapes(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(logical axes, shape) of the LoRA adapters (``models/lora.py``): A [L, *in, r] and B [L, r, *out] of each
    target, float32; none without ``cfg.lora``."""
    if cfg.lora is None:
        return []
    L, E, F, N, K, H, r = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.lora.rank)
    embed, mlp, q, kv = (("embed",), (E,)), (("mlp",), (F,)), (("heads", "head_dim"), (N, H)), (
        ("kv_heads", "head_dim"), (K, H))
    io = {"q": (embed, q), "k": (embed, kv), "v": (embed, kv), "o": (q, embed), "gate": (embed, mlp),
          "up": (embed, mlp), "down": (mlp, embed)}
    out = []
    for target in cfg.lora.targets:
        (in_axes, in_shape), (out_axes, out_shape) = io[target]
        out += [(("layers", *in_axes, "lora_rank"), (L, *in_shape, r)), (("layers", "lora_rank", *out_axes),
                                                                          (L, r, *out_shape))]
    return out


def param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in param_shapes(cfg))
