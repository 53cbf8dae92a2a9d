"""Tiny random transformers models for the parity tests (shared by test_models / test_weights / test_logprobs).

Configs have what real checkpoints have: GQA (4 heads, 2 kv heads), tied (qwen2) and untied (qwen3, llama)
embeddings, Qwen3 head_dim != hidden/heads, and llama3 rope scaling with original_max_position_embeddings=16 so
that the 48-token test sequences run past it. Every param is perturbed after init so that biases and norm scales
(initialised to 0/1 by transformers) are non-trivial.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 128
PAD = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON | dict(tie_word_embeddings=True, rope_parameters=dict(
            rope_type="default", rope_theta=1_000_000.0)) | overrides)
    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON | dict(head_dim=16, tie_word_embeddings=False) | overrides)
    if family == "llama":
        return transformers.LlamaConfig(
            **COMMON | dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE) | overrides)
    raise ValueError(family)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_causal_lm(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    return perturb_(model, seed)


def hf_classifier(family: str, num_labels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = hf_config(family, num_labels=num_labels)
    return perturb_(transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager"), seed)


def left_padded(lengths, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxT, mask_BxT): row b has lengths[b] real tokens (ids >= 3) at the right, PAD on the left."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (len(lengths), T))
    mask = np.arange(T)[None, :] >= (T - np.asarray(lengths))[:, None]
    return np.where(mask, tokens, PAD).astype(np.int32), mask.astype(np.int32)


def positions_from_mask(mask_BxT: np.ndarray) -> np.ndarray:
    """What generation uses for left-padded rows: real tokens counted from 0."""
    return np.maximum(np.cumsum(mask_BxT, axis=1) - 1, 0)


def torch_forward(model: torch.nn.Module, tokens_BxT, mask_BxT=None) -> np.ndarray:
    """logits (causal LM) or pooled scores (classifier), float32 numpy."""
    kwargs = {}
    if mask_BxT is not None:
        kwargs = dict(attention_mask=torch.tensor(mask_BxT), position_ids=torch.tensor(positions_from_mask(mask_BxT)))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens_BxT), dtype=torch.long), **kwargs).logits.float().numpy()
