"""token_logprobs equals log_softmax-gather of the full logits, and never holds float32 [B, T, V] logits."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models import ModelConfig, build_model, load_hf, token_logprobs

from tiny_hf import VOCAB, hf_causal_lm, left_padded

B, T = 3, 16


@pytest.fixture(scope="module", params=["qwen2", "llama"])  # tied and untied lm head
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_causal_lm(request.param).save_pretrained(folder)
    return load_hf(folder)


@pytest.fixture(scope="module")
def full_logits(model):
    """float64 full logits of the parity batch, computed once per model."""
    tokens, mask = left_padded([T, 11, 2], T, seed=1)
    return tokens, mask, np.asarray(model(tokens, attention_mask_BxT=mask), np.float64)


def reference(logits, tokens, mask, temperature):
    logits = logits / temperature
    logp_all = (logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True))
    logps = np.zeros(tokens.shape)
    logps[:, 1:] = np.take_along_axis(logp_all[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    entropy = np.zeros(tokens.shape)
    entropy[:, 1:] = -(np.exp(logp_all) * logp_all).sum(-1)[:, :-1]
    valid = np.zeros(tokens.shape, bool)
    valid[:, 1:] = mask[:, 1:].astype(bool) & mask[:, :-1].astype(bool)
    return np.where(valid, logps, 0), np.where(valid, entropy, 0)


jit_token_logprobs = nnx.jit(token_logprobs, static_argnames=("return_entropy", "chunk_size"))


@pytest.mark.parametrize("chunk_size", [1, 6, 64])
def test_matches_full_log_softmax_gather(model, full_logits, chunk_size):
    tokens, mask, logits = full_logits
    logps, entropy = jit_token_logprobs(model, tokens, mask, temperature=0.7, return_entropy=True,
                                        chunk_size=chunk_size)
    assert logps.shape == entropy.shape == (B, T) and logps.dtype == entropy.dtype == jnp.float32
    ref_logps, ref_entropy = reference(logits, tokens, mask, 0.7)
    np.testing.assert_allclose(np.asarray(logps), ref_logps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, atol=1e-5, rtol=0)
    assert (np.asarray(logps)[2, : T - 1] == 0).all()  # row 2 has only 2 real tokens: just the last is scored
    if chunk_size == 6:  # default temperature, no entropy
        plain = jit_token_logprobs(model, tokens, mask, chunk_size=chunk_size)
        np.testing.assert_allclose(np.asarray(plain), reference(logits, tokens, mask, 1.0)[0], atol=1e-5, rtol=0)


def _big_f32_avals(jaxpr, min_size):
    """Every float32 value in a jaxpr (recursively, incl. scan/remat bodies) with a batch and a vocab axis and at
    least min_size elements: the [.., B, .., V] logits buffers (the [V, E] embedding has no batch axis)."""
    found = []
    for eqn in jaxpr.eqns:
        for var in list(eqn.invars) + list(eqn.outvars):
            aval = getattr(var, "aval", None)
            if aval is not None and getattr(aval, "dtype", None) == jnp.float32 and {B, VOCAB} <= set(aval.shape):
                if np.prod(aval.shape) >= min_size:
                    found.append(tuple(aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _big_f32_avals(sub, min_size)
    return found


def _loss_jaxprs(model, chunk_size):
    tokens, mask = left_padded([T, 9, 5], T, seed=2)
    graphdef, state = nnx.split(model)

    def loss(state):
        logps, entropy = token_logprobs(nnx.merge(graphdef, state), tokens, mask, return_entropy=True,
                                       chunk_size=chunk_size)
        return logps.sum() + 0.1 * entropy.sum()

    return jax.make_jaxpr(loss)(state).jaxpr, jax.make_jaxpr(jax.grad(loss))(state).jaxpr


def test_no_batch_by_length_by_vocab_float32_buffer_forward_or_backward(model):
    bxtxv = B * (T - 1) * VOCAB
    for jaxpr in _loss_jaxprs(model, chunk_size=4):
        assert _big_f32_avals(jaxpr, bxtxv // 2) == []
    # the detector does see the full buffer when one chunk covers the whole sequence
    forward, backward = _loss_jaxprs(model, chunk_size=T)
    assert (B, T - 1, VOCAB) in _big_f32_avals(forward, bxtxv) and (B, T - 1, VOCAB) in _big_f32_avals(backward, bxtxv)


def test_compiled_temp_memory_stays_below_one_float32_logits_buffer():
    """XLA's own buffer accounting, on a vocab large enough for the logits to dominate: with chunk 4 of 63 positions
    the forward and the backward need well under one float32 [B, T-1, V] buffer; one whole-sequence chunk needs it."""
    vocab, batch, length = 8192, 4, 64
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    bxtxv_bytes = batch * (length - 1) * vocab * 4

    def temp_bytes(chunk_size, grad):
        def loss(s):
            return token_logprobs(nnx.merge(graphdef, s), tokens, mask, chunk_size=chunk_size,
                                  return_entropy=True)[0].sum()

        return jax.jit(jax.grad(loss) if grad else loss).lower(state).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(4, grad=False) < bxtxv_bytes / 4
    assert temp_bytes(4, grad=True) < bxtxv_bytes / 2
    assert temp_bytes(length, grad=False) >= bxtxv_bytes


def test_rejects_bad_inputs(model):
    tokens, mask = left_padded([T], T)
    with pytest.raises(ValueError, match="mask_BxT has shape"):
        token_logprobs(model, tokens, mask[:, :-1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(model, tokens, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, tokens, mask, chunk_size=0)
