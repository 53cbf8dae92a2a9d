"""Frozen reward model: a HF ``*ForSequenceClassification`` checkpoint scoring (prompt, completion) pairs.

Each pair becomes the conversation ``[user: prompt, assistant: completion]`` rendered by the tokenizer's chat
template (``prompt + completion`` when it has none), tokenised without extra special tokens, kept to its last
``max_length`` tokens, left-padded to a power-of-two bucket and scored in fixed-size batches by one jitted forward
per bucket. The score is the chosen label's logit at the last non-pad token, as transformers pools.

Heavy imports (transformers, the model code) happen when a scorer is built, so worker processes that import the
rewards package stay light.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

MIN_BUCKET = 16


class RewardModelScorer:
    """Loads a HF sequence-classification folder (``load_hf``) and its tokenizer once;
    ``scorer(users, completions)``."""

    def __init__(
        self, path: str, *, tokenizer_path: str | None = None, dtype: str = "float32", max_length: int = 2048,
        batch_size: int = 8, label: int = 0,
    ) -> None:
        from flax import nnx
        from transformers import AutoTokenizer

        from grpo_jax.models import SequenceClassifier, load_hf

        if max_length < 1 or batch_size < 1:
            raise ValueError(f"reward_model: max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        model = load_hf(path, dtype=dtype)
        if not isinstance(model, SequenceClassifier):
            raise ValueError(f"reward_model: {path} is not a *ForSequenceClassification checkpoint "
                             f"(got {type(model).__name__})")
        if not 0 <= label < model.config.num_labels:
            raise ValueError(f"reward_model: label must be in [0, {model.config.num_labels}), got {label}")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        self.max_length, self.batch_size, self.label = max_length, batch_size, label
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)
        self._state = state
        self._forward = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, attention_mask_BxT=mask))

    def render(self, user: str, completion: str) -> str:
        if not self.tokenizer.chat_template:
            return user + completion
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def __call__(self, users: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """scores_B float32."""
        texts = [self.render(u, c) for u, c in zip(users, completions, strict=True)]
        ids = [row[-self.max_length :] for row in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        scores = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            T = min(max(MIN_BUCKET, 1 << (max(map(len, chunk)) - 1).bit_length()), self.max_length)
            tokens_BxT = np.full((self.batch_size, T), self.pad_id, np.int32)
            mask_BxT = np.zeros((self.batch_size, T), np.int32)
            for b, row in enumerate(chunk):  # left padding: the scored last token sits at T-1
                tokens_BxT[b, T - len(row) :], mask_BxT[b, T - len(row) :] = row, 1
            scores_BxC = self._forward(self._state, tokens_BxT, mask_BxT)
            scores.append(np.asarray(scores_BxC)[: len(chunk), self.label])
        return np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)


@functools.lru_cache(maxsize=2)
def cached_scorer(path: str, tokenizer_path: str | None, dtype: str, max_length: int, batch_size: int, label: int):
    """One loaded scorer per distinct setting, kept for the life of the process (the model is frozen)."""
    return RewardModelScorer(
        path, tokenizer_path=tokenizer_path, dtype=dtype, max_length=max_length, batch_size=batch_size, label=label
    )


def reward_model(
    prompts: Sequence[str], completions: Sequence[str], examples: Sequence[Mapping[str, Any]], *, path: str,
    tokenizer_path: str | None = None, user_turn: Literal["question", "prompt"] = "question", dtype: str = "float32",
    max_length: int = 2048, batch_size: int = 8, label: int = 0,
) -> np.ndarray:
    """Reward-model scores for a batch.

    user_turn: ``question`` uses ``example["question"]`` (the raw question, before the policy's own chat template
    was applied) as the user message; ``prompt`` uses the prompt string as given.
    """
    if user_turn not in ("question", "prompt"):
        raise ValueError(f"reward_model: user_turn must be 'question' or 'prompt', got {user_turn!r}")
    users = [ex["question"] for ex in examples] if user_turn == "question" else list(prompts)
    return cached_scorer(path, tokenizer_path, dtype, max_length, batch_size, label)(users, completions)
