"""Decode over the shared-prompt cache: attention equals the full-cache attention, decode steps equal the full
forward, samples equal a cache-free sampler's, and decoding stops once every row has finished."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import rollout
from grpo_jax.models import KVCache, load_hf
from grpo_jax.models.cache import GroupKVCache
from grpo_jax.models.decode import decode_step, group_attention, segment_ends
from grpo_jax.models.transformer import attend
from grpo_jax.rollout import SamplingConfig, bucket, generate, next_token, pad_prompts

from test_rollout import PROMPTS, tiny_model
from tiny_hf import PAD, hf_causal_lm


def test_group_attention_equals_attention_over_the_full_cache():
    P, G, K, R, L, S, H = 3, 4, 2, 3, 5, 8, 16
    B, N, index = P * G, K * R, 5
    keys = jax.random.split(jax.random.key(0), 5)
    q_BxNxH = jax.random.normal(keys[0], (B, N, H))
    prompt_k, prompt_v = (jax.random.normal(k, (P, K, L, H)) for k in keys[1:3])
    own_k, own_v = (jax.random.normal(k, (B, K, S, H)) for k in keys[3:5])
    prompt_mask_PxL = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
    def blocks(x_BxKxSxH):  # completion slots 0-2 and 3-7 as two blocks
        return x_BxKxSxH[:, :, :3], x_BxKxSxH[:, :, 3:]

    got = group_attention(q_BxNxH, prompt_k, prompt_v, prompt_mask_PxL, blocks(own_k), blocks(own_v), index)
    # the old layout: every row holds its prompt's L slots then its S completion slots; the query sits at slot
    # L + index, so completion slots index+1.. are beyond the causal limit
    full_k = jnp.concatenate([jnp.repeat(prompt_k, G, axis=0), own_k], axis=2)
    full_v = jnp.concatenate([jnp.repeat(prompt_v, G, axis=0), own_v], axis=2)
    key_mask_BxLS = jnp.concatenate([jnp.repeat(prompt_mask_PxL, G, axis=0), jnp.ones((B, S), bool)], axis=1)
    want = attend(q_BxNxH[:, None], full_k, full_v, key_mask_BxLS, L + index)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    one_block = group_attention(q_BxNxH, prompt_k, prompt_v, prompt_mask_PxL, (own_k,), (own_v,), index)
    np.testing.assert_allclose(one_block, want, atol=1e-5)
    # a completion slot past `index` changes nothing
    moved = group_attention(q_BxNxH, prompt_k, prompt_v, prompt_mask_PxL, blocks(own_k.at[:, :, index + 1].set(9.0)),
                            blocks(own_v), index)
    np.testing.assert_allclose(moved, got, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_decode_steps_match_the_full_forward(family, tmp_path):
    hf_causal_lm(family).save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    P, G, L, D = 2, 3, 10, 5
    prompts = [list(range(3, 3 + L)), [7, 9, 11, 13]]
    prompt_PxL, mask_PxL = pad_prompts(prompts, PAD, P, L)
    completion_BxD = np.random.default_rng(0).integers(3, 128, (P * G, D)).astype(np.int32)  # different per row

    @nnx.jit
    def run(model, prompt_PxL, mask_PxL, completion_BxD):
        _, prefill = model.hidden_states(prompt_PxL, attention_mask_BxT=mask_PxL,
                                         cache=KVCache.init(model.config, P, L))
        cache, layers, logits = GroupKVCache.from_prefill(prefill, G).extend(2), model.model.split_layers(), []
        for t in range(D):
            cache = cache.extend(D) if t == 2 else cache  # slots 0-1 written: a second block for the rest
            logits_BxV, cache = decode_step(model, layers, completion_BxD[:, t], cache)
            logits.append(logits_BxV)
        return jnp.stack(logits, axis=1), cache

    got_BxDxV, cache = run(model, prompt_PxL, mask_PxL, completion_BxD)
    rows = np.repeat(np.arange(P), G)
    full = model(np.concatenate([prompt_PxL[rows], completion_BxD], 1),
                 attention_mask_BxT=np.pad(mask_PxL[rows], ((0, 0), (0, D)), constant_values=True))
    np.testing.assert_allclose(got_BxDxV, full[:, L:], atol=1e-5)
    assert cache.prompt_k_PxKxLxH[0].shape[0] == P and cache.k_blocks[0][0].shape[0] == P * G  # prompt K/V once
    assert [b.shape[2] for b in cache.k_blocks[1]] == [2, D - 2]
    assert int(cache.index) == D and cache.positions_B.tolist() == [L + D] * G + [4 + D] * G


def test_segment_ends_halve_the_steps_down_to_16_at_most_4_times():
    assert segment_ends(0) == () and segment_ends(7) == (7,) and segment_ends(31) == (16, 31)
    assert segment_ends(32) == (16, 32) and segment_ends(100) == (25, 50, 100)
    assert segment_ends(511) == (64, 128, 256, 511) and segment_ends(1023) == (128, 256, 512, 1023)


def cache_free_samples(model, prompts, cfg: SamplingConfig, key):
    """The sampler without any cache: each token drawn (key fold_in(key, t)) from a full forward of the sequence so
    far, padded on the right to one length so that one compilation serves every step."""
    G, T = cfg.num_samples, cfg.max_new_tokens
    prompt_PxL, mask_PxL = pad_prompts(prompts, PAD, len(prompts), bucket(max(map(len, prompts))))
    L = prompt_PxL.shape[1]
    seq = np.pad(np.repeat(prompt_PxL, G, 0), ((0, 0), (0, T)))
    mask = np.pad(np.repeat(mask_PxL, G, 0), ((0, 0), (0, T)))
    forward = nnx.jit(lambda m, s, a: m(s, attention_mask_BxT=a))
    finished = np.zeros(len(seq), bool)
    logps = np.zeros((len(seq), T), np.float32)
    for t in range(T):
        logits_BxV = forward(model, seq, mask)[:, L + t - 1]
        token, logp = (np.asarray(x) for x in next_token(logits_BxV, jax.random.fold_in(key, t), cfg))
        seq[:, L + t], mask[:, L + t] = np.where(finished, PAD, token), True
        logps[:, t] = np.where(finished, 0.0, logp)
        finished |= np.isin(seq[:, L + t], cfg.eos_ids)
    return seq[:, L:], logps


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_samples_equal_a_cache_free_sampler(top_p):
    model = tiny_model(seed=2)
    cfg = SamplingConfig(max_new_tokens=34, num_samples=3, temperature=0.8, top_p=top_p, eos_ids=(5, 6, 7),
                         pad_id=PAD)  # 34 tokens: two cache segments (17, 33 slots)
    got = generate(model, PROMPTS, max_new_tokens=34, num_samples=3, temperature=0.8, top_p=top_p,
                   eos_ids=(5, 6, 7), pad_id=PAD, rng=jax.random.key(4))
    want_tokens, want_logps = cache_free_samples(model, PROMPTS, cfg, jax.random.key(4))
    np.testing.assert_array_equal(got.completion_BxT, want_tokens)
    np.testing.assert_allclose(got.logprobs_BxT, want_logps, atol=1e-5)
    assert 0 < int(got.finished_B.sum()) < len(want_tokens)  # some rows stopped at an EOS, some ran to the end


def test_decoding_stops_once_every_row_has_finished(monkeypatch):
    model = tiny_model()
    steps, real_decode = [], rollout.decode

    def recording_decode(*args, **kwargs):  # the decode steps each sample() call ran
        out = real_decode(*args, **kwargs)
        jax.debug.callback(lambda s: steps.append(int(s)), out[-1])
        return out

    monkeypatch.setattr(rollout, "decode", recording_decode)
    kw = dict(max_new_tokens=40, temperature=0.0, pad_id=PAD)
    free = generate(model, PROMPTS, **kw)
    assert steps == [39]  # no EOS: 40 tokens, the last one needs no decode step after it
    eos = tuple(sorted(set(free.completion_BxT[:, 2].tolist())))  # every row's third greedy token
    stopped = generate(model, PROMPTS, eos_ids=eos, **kw)
    longest = int(stopped.lengths_B.max())
    assert longest <= 3 and steps == [39, longest - 1]
    np.testing.assert_array_equal(stopped.completion_BxT[:, longest:], PAD)
