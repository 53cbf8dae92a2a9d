"""The two model variants: ``CausalLM`` (policy / reference) and ``SequenceClassifier`` (frozen reward model).

Both wrap a ``Decoder`` as ``self.model`` (HF's ``model.*`` prefix); the LM adds ``lm_head`` (absent when tied to
the embedding) and the classifier adds ``score`` (HF ``*ForSequenceClassification``: no bias).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.mesh import gather_fsdp, split_vocab
from grpo_jax.models.cache import KVCache
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import Decoder, init_param


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.num_labels is not None:
            raise ValueError(f"num_labels={cfg.num_labels} describes a SequenceClassifier, not a CausalLM")
        self.config = cfg
        self.model = Decoder(cfg, rngs=rngs)
        shape = (cfg.hidden_size, cfg.vocab_size)
        self.lm_head = None if cfg.tie_word_embeddings else init_param(rngs, cfg, ("embed", "vocab"), shape, "normal")

    def __call__(self, tokens_BxT, positions_BxT=None, attention_mask_BxT=None, cache: KVCache | None = None,
                 layers: tuple[nnx.State, ...] | None = None):
        """logits_BxTxV in the compute dtype; ``(logits_BxTxV, new_cache)`` when a cache is given.

        ``attention_mask_BxT`` (1 = real token) excludes pad keys; with left padding, real positions get the same
        logits as the unpadded row. ``positions_BxT`` default: each row's real tokens counted from 0 (continuing
        from the cache's ``lengths_B``). With a cache the tokens are written at slot ``cache.index`` for all rows;
        the caller keeps ``cache.index + T <= cache.max_length`` (writes past the end are clamped, not checked).
        A decode loop passes ``layers=model.model.split_layers()`` computed once before the loop.
        """
        hidden_BxTxE, new_cache = self.model(tokens_BxT, positions_BxT, attention_mask_BxT, cache, layers)
        logits_BxTxV = self.logits(hidden_BxTxE)
        return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)

    def hidden_states(self, tokens_BxT, positions_BxT=None, attention_mask_BxT=None, cache: KVCache | None = None):
        """Final normed hidden states hidden_BxTxE (the lm head's input); ``(hidden, new_cache)`` with a cache."""
        hidden_BxTxE, new_cache = self.model(tokens_BxT, positions_BxT, attention_mask_BxT, cache)
        return hidden_BxTxE if cache is None else (hidden_BxTxE, new_cache)

    def lm_head_ExV(self, *, for_logprobs: bool = False) -> jax.Array:
        """The output projection [E, V] in the compute dtype (the transposed embedding when tied): gathered over
        fsdp once, after the cast, for logits; for token log-probs (``models.logprobs``) its vocab split instead
        (``mesh.split_vocab``)."""
        w = self.model.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        w = w.astype(self.config.compute_dtype)
        return split_vocab(w) if for_logprobs else gather_fsdp(w, ("embed", "vocab"))

    def logits(self, hidden_BxTxE: jax.Array) -> jax.Array:
        return hidden_BxTxE @ self.lm_head_ExV()


def last_token_index(tokens_BxT: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Index of the rightmost token that is not ``pad_token_id`` (0 if a row is all pad; T-1 with no pad id).

    This is exactly transformers' ``*ForSequenceClassification`` pooling rule, so left and right padding both work;
    note that a real token equal to the pad id (e.g. eos used as pad) is skipped, as in transformers.
    """
    B, T = tokens_BxT.shape
    if pad_token_id is None:
        return jnp.full((B,), T - 1, jnp.int32)
    not_pad_BxT = (tokens_BxT != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad_BxT, axis=-1)


class SequenceClassifier(nnx.Module):
    """Reward-model head: ``score`` applied to the hidden state of the last non-pad token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.num_labels is None:
            raise ValueError("SequenceClassifier needs num_labels (e.g. 1 for a scalar reward model)")
        self.config = cfg
        self.model = Decoder(cfg, rngs=rngs)
        self.score = init_param(rngs, cfg, ("embed", "classes"), (cfg.hidden_size, cfg.num_labels), "normal")

    def __call__(self, tokens_BxT, positions_BxT=None, attention_mask_BxT=None) -> jax.Array:
        """scores_BxC (float32) at the last non-pad token of each row (pooled by ``pad_token_id``, as transformers)."""
        hidden_BxTxE, _ = self.model(tokens_BxT, positions_BxT, attention_mask_BxT)
        last_B = last_token_index(jnp.asarray(tokens_BxT), self.config.pad_token_id)
        hidden_BxE = jnp.take_along_axis(hidden_BxTxE, last_B[:, None, None], axis=1)[:, 0]
        return (hidden_BxE @ self.score[...].astype(hidden_BxE.dtype)).astype(jnp.float32)


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> CausalLM | SequenceClassifier:
    """A randomly initialised CausalLM, or a SequenceClassifier when ``cfg.num_labels`` is set."""
    return (CausalLM if cfg.num_labels is None else SequenceClassifier)(cfg, rngs=rngs)
