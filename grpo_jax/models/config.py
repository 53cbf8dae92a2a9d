"""ModelConfig: one frozen description of a Qwen2/2.5, Qwen3 or Llama-3 decoder, read from and written to HF
config.json.

The three families differ only by flags: Qwen2 has q/k/v biases, Qwen3 has per-head RMSNorm on q and k, Llama may
have ``attention_bias``/``mlp_bias`` and ``rope_scaling`` of type llama3. Both config.json layouts on the hub are
read: transformers-5 ``rope_parameters: {rope_type, rope_theta, ...}`` and the older top-level ``rope_theta`` plus
``rope_scaling: {type|rope_type, factor, ...}``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

ModelType = Literal["qwen2", "qwen3", "llama"]
DType = Literal["float32", "bfloat16", "float16"]
MODEL_TYPES: tuple[str, ...] = ("qwen2", "qwen3", "llama")
_ARCH_PREFIX = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """``rope_type`` linear (positions / factor) or llama3 (Llama-3.1 frequency-dependent interpolation)."""

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: 'linear', 'llama3' (or none)")
        if self.factor <= 0:
            raise ValueError(f"rope factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope needs high_freq_factor > low_freq_factor, got {self}")


LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """LoRA adapters (``grpo_jax.models.lora``): rank r, scale alpha / r, on the ``targets`` projections."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1 or not self.alpha > 0:
            raise ValueError(f"lora: rank must be >= 1 and alpha > 0, got rank={self.rank} alpha={self.alpha}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets={list(self.targets)}: a non-empty set of {list(LORA_TARGETS)}")
        if self.dropout != 0.0:
            raise ValueError(f"lora.dropout={self.dropout}: only 0.0 is implemented (the train step draws no dropout "
                             "masks); RL fine-tuning with LoRA commonly runs without dropout")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model_type: ModelType
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: always; Llama/Qwen3: attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    num_labels: int | None = None  # set: sequence-classification head (reward model) instead of the LM head
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: DType = "float32"  # compute dtype (activations, matmul inputs); attention softmax is always float32
    param_dtype: DType = "float32"
    remat: bool = False  # jax.checkpoint each layer (recompute activations in the backward pass)
    scan_layers: bool = True  # lax.scan over the layers (compile time flat in depth); False unrolls (faster on CPU)
    # the full-sequence forward's causal attention in query blocks of this many positions, block j over keys
    # [0, (j+1)·block) only: the masked upper triangle is never computed (long sequences: 1.6x faster update on CPU)
    attention_block: int | None = 64
    lora: LoRAConfig | None = None  # adapters on the layers' projections (not part of config.json)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_block is not None and self.attention_block < 1:
            raise ValueError(f"attention_block must be >= 1 or None, got {self.attention_block}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: 'float32', 'bfloat16', 'float16'")
        if self.num_labels is not None and self.num_labels <= 0:
            raise ValueError(f"num_labels must be > 0 or None, got {self.num_labels}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Read a config.json dict (either rope layout). ``overrides`` set fields such as dtype or remat."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: {MODEL_TYPES}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        if hf.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported; sliding-window attention is not implemented")
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        archs = hf.get("architectures") or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            num_labels=num_labels if is_classifier else None,
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos := hf.get("eos_token_id"), list) else eos,
            **_rope_fields(hf),
        )
        return cls(**(fields | overrides))

    def to_hf_config(self) -> dict[str, Any]:
        """config.json in transformers-5 form (``rope_parameters``) that transformers loads back."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope |= dataclasses.asdict(self.rope_scaling)
            if self.rope_scaling.rope_type == "linear":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    rope.pop(key)
        head = "ForCausalLM" if self.num_labels is None else "ForSequenceClassification"
        hf: dict[str, Any] = {
            "architectures": [_ARCH_PREFIX[self.model_type] + head],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos := self.eos_token_id, tuple) else eos,
            "dtype": self.param_dtype,
        }
        if self.model_type == "qwen2" and self.o_bias:
            raise ValueError("qwen2 has no output-projection bias; o_bias=True cannot be saved as a qwen2 config.json")
        if self.model_type != "qwen2":
            if self.qkv_bias != self.o_bias:
                raise ValueError(
                    f"{self.model_type} attention_bias covers q/k/v/o together; got {self.qkv_bias=} {self.o_bias=}")
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.num_labels is not None:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return hf


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta and RopeScaling from ``rope_parameters`` (transformers 5) or top-level
    ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: 'default', 'linear', 'llama3'")
    scaling = {"rope_type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling |= {
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(original),
        }
    return {"rope_theta": theta, "rope_scaling": RopeScaling(**scaling)}
