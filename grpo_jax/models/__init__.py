"""Flax NNX Qwen2/2.5, Qwen3 and Llama-3 decoders with HF weight import/export and chunked token log-probs."""
from grpo_jax.models.cache import KVCache
from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.heads import CausalLM, SequenceClassifier, build_model, last_token_index
from grpo_jax.models.logprobs import token_logprobs
from grpo_jax.models.weights import WEIGHT_TABLE, load_hf, save_hf

__all__ = [
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "SequenceClassifier",
    "WEIGHT_TABLE",
    "build_model",
    "last_token_index",
    "load_hf",
    "save_hf",
    "token_logprobs",
]
