"""Parity of the NNX decoder with transformers' torch models, padding invariance, KV cache, reward head."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models import CausalLM, KVCache, load_hf

from tiny_hf import PAD, hf_causal_lm, hf_classifier, left_padded, torch_forward

FAMILIES = ("qwen2", "qwen3", "llama")
T = 48  # > original_max_position_embeddings=16 of the llama3 rope config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (torch model, our model loaded from its save_pretrained folder)."""
    out = {}
    for family in FAMILIES:
        hf = hf_causal_lm(family)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (hf, load_hf(folder))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_logits_match_transformers(pair, family):
    hf, ours = pair[family]
    tokens, _ = left_padded([T, T], T, seed=1)
    got = np.asarray(ours(jnp.asarray(tokens)))
    assert got.shape == (2, T, 128)
    np.testing.assert_allclose(got, torch_forward(hf, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_transformers_and_unpadded_rows(pair, family):
    hf, ours = pair[family]
    lengths = [T, 30, 7]
    tokens, mask = left_padded(lengths, T, seed=2)
    got = np.asarray(ours(tokens, attention_mask_BxT=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], torch_forward(hf, tokens, mask)[real], atol=1e-4, rtol=0)
    for b, n in list(enumerate(lengths))[1:]:  # each padded row equals the same tokens run alone without padding
        alone = np.asarray(ours(tokens[b : b + 1, T - n :]))[0]
        np.testing.assert_allclose(got[b, T - n :], alone, atol=1e-5, rtol=0)
    assert np.isfinite(got).all()  # pad query positions give finite (meaningless) logits, not NaN


def test_llama3_rope_scaling_changes_the_logits(pair):
    """The llama3 parity test is only meaningful if the scaling is active at these lengths."""
    _, ours = pair["llama"]
    unscaled = _with_config(ours, rope_scaling=None)
    tokens, _ = left_padded([T], T, seed=3)
    assert np.abs(np.asarray(ours(tokens)) - np.asarray(unscaled(tokens))).max() > 1e-2


def _with_config(model, **changes):
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    new_cfg = dataclasses.replace(clone.config, **changes)
    clone.config = new_cfg
    clone.model.config = new_cfg
    return clone


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_kv_cache_prefill_then_decode_matches_full_forward(pair, family):
    _, ours = pair[family]
    P, Tp, D = 2, 12, 6
    prompt, prompt_mask = left_padded([Tp, 5], Tp, seed=4)
    completion = np.random.default_rng(5).integers(3, 128, (P, D)).astype(np.int32)
    full = np.asarray(ours(np.concatenate([prompt, completion], 1),
                           attention_mask_BxT=np.pad(prompt_mask, ((0, 0), (0, D)), constant_values=1)))

    step = nnx.jit(lambda m, tok, mask, cache: m(tok, attention_mask_BxT=mask, cache=cache))
    logits, cache = step(ours, prompt, prompt_mask, KVCache.init(ours.config, P, Tp + D))
    real = prompt_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :Tp][real], atol=1e-5)
    for t in range(D):
        logits, cache = step(ours, completion[:, t : t + 1], np.ones((P, 1), np.int32), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, Tp + t], atol=1e-5)
    assert int(cache.index) == Tp + D
    np.testing.assert_array_equal(cache.lengths_B, [Tp + D, 5 + D])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_reward_head_matches_qwen2_for_sequence_classification(tmp_path, padding):
    hf = hf_classifier("qwen2", num_labels=1)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    tokens, mask = left_padded([20, 13, 6, 20], 20, seed=7)
    if padding == "right":
        order = np.argsort(~mask.astype(bool), axis=1, kind="stable")
        tokens, mask = np.take_along_axis(tokens, order, 1), np.take_along_axis(mask, order, 1)
    got = np.asarray(ours(tokens, attention_mask_BxT=mask))
    assert got.shape == (4, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_forward(hf, tokens, mask), atol=1e-4, rtol=0)
    assert (tokens[:, -1] == PAD).any() == (padding == "right")


@pytest.mark.parametrize("override, plain_mark, variant_mark", [
    ({"remat": True}, None, "remat"),  # jax.checkpoint around each layer
    ({"scan_layers": False}, "unroll=1", "unroll=2"),  # the 2-layer scan unrolled
])
def test_remat_and_unrolled_layers_give_same_logits_and_grads(pair, override, plain_mark, variant_mark):
    _, ours = pair["qwen2"]
    variant = _with_config(ours, **override)
    tokens, mask = left_padded([16, 9], 16, seed=8)

    def loss(model):
        return jnp.mean(model(tokens, attention_mask_BxT=mask)[..., :5] ** 2)

    jaxprs = [str(jax.make_jaxpr(lambda s, g=g: loss(nnx.merge(g, s)))(s)) for g, s in map(nnx.split, (ours, variant))]
    assert variant_mark not in jaxprs[0] and variant_mark in jaxprs[1]
    assert plain_mark is None or plain_mark in jaxprs[0]
    np.testing.assert_allclose(variant(tokens, attention_mask_BxT=mask), ours(tokens, attention_mask_BxT=mask),
                               atol=1e-5)
    grad = nnx.jit(nnx.grad(loss))
    for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(variant))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_blocked_causal_attention_equals_one_block(pair):
    """Query blocks of 5 over a 16-token left-padded batch (blocks 5, 5, 5, 1, each over its key prefix) give the
    logits and gradients of one attention over all keys."""
    _, ours = pair["qwen2"]
    whole, blocked = _with_config(ours, attention_block=None), _with_config(ours, attention_block=5)
    tokens, mask = left_padded([16, 9], 16, seed=8)

    def loss(model):  # real positions only: a pad query sees no key, its output is finite but meaningless
        return jnp.mean(jnp.where(mask[..., None], model(tokens, attention_mask_BxT=mask)[..., :5], 0.0) ** 2)

    n_dots = [str(jax.make_jaxpr(lambda s, g=g: loss(nnx.merge(g, s)))(s)).count("dot_general")
              for g, s in map(nnx.split, (whole, blocked))]
    assert n_dots[1] > n_dots[0]  # really blocked
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(blocked(tokens, attention_mask_BxT=mask))[real],
                               np.asarray(whole(tokens, attention_mask_BxT=mask))[real], atol=1e-5)
    grad = nnx.jit(nnx.grad(loss))
    for a, b in zip(jax.tree.leaves(grad(whole)), jax.tree.leaves(grad(blocked))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_with_fp32_params(tmp_path):
    hf = hf_causal_lm("llama")
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype=jnp.bfloat16, param_dtype="float32")
    assert isinstance(model, CausalLM) and model.model.embed[...].dtype == jnp.float32
    tokens, _ = left_padded([24], 24, seed=9)
    logits = model(tokens)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), torch_forward(hf, tokens), atol=0.1)
