"""Rollout engine: greedy parity with transformers, sampling correctness, prefill-once, bounded compilations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from grpo_jax import rollout
from grpo_jax.models import CausalLM, ModelConfig, build_model, load_hf, token_logprobs
from grpo_jax.rollout import SamplingConfig, first_argmax, generate, next_token, truncate_logits
from grpo_jax.tracking import compile_count

from tiny_hf import PAD, hf_causal_lm

PROMPTS = [[5, 17, 9], [40, 41, 42, 43, 44, 45, 46], [7], [99, 3, 12, 8, 60]]  # ragged


def tiny_model(seed=0, vocab=128) -> CausalLM:
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    return build_model(cfg, rngs=nnx.Rngs(seed))


def hf_greedy(hf, prompts, max_new_tokens, eos_id):
    L = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=PAD, eos_token_id=eos_id)
    rows = []
    for row in out[:, L:].tolist():  # cut at the first EOS (kept), as our completion mask does
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_greedy_matches_transformers_with_eos_stopping(family, tmp_path):
    hf = hf_causal_lm(family)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    T = 12
    free = generate(model, PROMPTS, max_new_tokens=T, temperature=0.0, pad_id=PAD)
    # choose as EOS the token row 0 emits greedily at step 4 (so row 0 must stop there, EOS included)
    eos = int(free.completion_BxT[0, 4])
    ours = generate(model, PROMPTS, max_new_tokens=T, temperature=0.0, eos_ids=(eos,), pad_id=PAD)
    theirs = hf_greedy(hf, PROMPTS, T, eos)
    for b, ref in enumerate(theirs):
        n = int(ours.lengths_B[b])
        assert ours.completion_BxT[b, :n].tolist() == ref, f"row {b}"
        assert bool(ours.finished_B[b]) == (ref[-1] == eos)
        assert bool(jnp.all(ours.completion_BxT[b, n:] == PAD)) and int(ours.completion_mask_BxT[b].sum()) == n
    assert int(ours.lengths_B[0]) <= 5 and bool(ours.finished_B[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_trainer_logprobs(temperature):
    model = tiny_model()
    r = generate(model, PROMPTS, max_new_tokens=10, num_samples=3, temperature=temperature, eos_ids=(2,), pad_id=0,
                 rng=3)
    tokens = jnp.concatenate([r.prompt_BxP, r.completion_BxT], axis=1)
    mask = jnp.concatenate([r.prompt_mask_BxP, r.completion_mask_BxT], axis=1)
    logps = token_logprobs(model, tokens, mask, temperature=temperature)[:, r.prompt_BxP.shape[1]:]
    np.testing.assert_allclose(np.where(r.completion_mask_BxT, logps, 0), r.logprobs_BxT, atol=1e-4)
    assert np.all(np.asarray(r.logprobs_BxT)[np.asarray(r.completion_mask_BxT)] < 0)


def test_first_argmax_is_argmax_ties_included():
    x = jnp.array([[1.0, 3.0, 3.0, 2.0], [-jnp.inf, -1.0, -jnp.inf, -1.0], [0.5, 0.5, 0.5, 0.5]])
    assert first_argmax(x).tolist() == [1, 1, 0] == jnp.argmax(x, axis=-1).tolist()


def draws(logits_V, cfg, n=20000, seed=0):
    logits_BxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    return np.asarray(next_token(logits_BxV, jax.random.key(seed), cfg)[0])


LOGITS = np.log(np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]))


def test_top_k_and_top_p_stay_in_the_allowed_set():
    got = draws(LOGITS, SamplingConfig(max_new_tokens=1, top_k=3))
    assert set(np.unique(got)) == {0, 1, 2}
    # top_p = 0.6: cumulative mass before each token is 0, .30, .55, .70 -> keep tokens 0, 1, 2
    got = draws(LOGITS, SamplingConfig(max_new_tokens=1, top_p=0.6))
    assert set(np.unique(got)) == {0, 1, 2}
    # top_k=4 then top_p=.5 on the renormalised top-4 (.366, .305, .183, .146): keep 0, 1
    got = draws(LOGITS, SamplingConfig(max_new_tokens=1, top_k=4, top_p=0.5))
    assert set(np.unique(got)) == {0, 1}
    kept = truncate_logits(jnp.asarray(LOGITS)[None], 2, None)
    assert np.isfinite(np.asarray(kept)).tolist() == [[True, True] + [False] * 6]


def test_truncated_sampling_stores_the_renormalised_log_prob():
    # top_k=3 keeps p = .30, .25, .15 (sum .70): q = p / .70 for the drawn token; top_p=0.6 keeps the same three
    for cfg in (SamplingConfig(max_new_tokens=1, top_k=3), SamplingConfig(max_new_tokens=1, top_p=0.6)):
        logits_BxV = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (500, len(LOGITS)))
        token_B, logp_B = next_token(logits_BxV, jax.random.key(0), cfg)
        want = np.log(np.exp(LOGITS)[np.asarray(token_B)] / 0.70)
        np.testing.assert_allclose(np.asarray(logp_B), want, rtol=1e-5)
    # T = 0.5 and top_k = 2: q over the two kept tokens of softmax(logits / 0.5) = p^2 renormalised
    token_B, logp_B = next_token(jnp.asarray(LOGITS, jnp.float32)[None].repeat(200, 0), jax.random.key(1),
                                 SamplingConfig(max_new_tokens=1, temperature=0.5, top_k=2))
    p2 = np.exp(LOGITS[:2]) ** 2
    np.testing.assert_allclose(np.asarray(logp_B), np.log(p2 / p2.sum())[np.asarray(token_B)], rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_frequencies_match_softmax_chi_square(temperature):
    n = 20000
    got = draws(LOGITS, SamplingConfig(max_new_tokens=1, temperature=temperature), n=n, seed=1)
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    observed = np.bincount(got, minlength=len(p))
    chi2 = np.sum((observed - n * p) ** 2 / (n * p))
    assert chi2 < 24.32  # chi-square critical value, 7 degrees of freedom, alpha = 0.001


def test_same_seed_same_output_and_samples_in_a_group_differ():
    model = tiny_model()
    kw = dict(max_new_tokens=8, num_samples=4, temperature=1.0, pad_id=0)
    a, b = generate(model, PROMPTS, rng=7, **kw), generate(model, PROMPTS, rng=7, **kw)
    c = generate(model, PROMPTS, rng=8, **kw)
    assert bool(jnp.all(a.completion_BxT == b.completion_BxT))
    assert not bool(jnp.all(a.completion_BxT == c.completion_BxT))
    for p in range(len(PROMPTS)):
        group = {tuple(row) for row in a.completion_BxT[p * 4:(p + 1) * 4].tolist()}
        assert len(group) > 1, f"all samples of prompt {p} are identical"
    assert bool(jnp.all(a.prompt_BxP[0] == a.prompt_BxP[3])) and not bool(jnp.all(a.prompt_BxP[0] == a.prompt_BxP[4]))


def test_prefill_runs_once_per_prompt(monkeypatch):
    calls = []
    real_hidden_states, real_decode_step = CausalLM.hidden_states, rollout.decode_step

    def hidden_states(self, tokens_BxT, *args, **kwargs):
        calls.append(("prefill", tuple(tokens_BxT.shape)))
        return real_hidden_states(self, tokens_BxT, *args, **kwargs)

    def decode_step(model, layers, token_B, cache):
        calls.append(("decode", token_B.shape[0], cache.prompt_k_PxKxLxH[0].shape[0]))
        return real_decode_step(model, layers, token_B, cache)

    monkeypatch.setattr(CausalLM, "hidden_states", hidden_states)
    monkeypatch.setattr(rollout, "decode_step", decode_step)
    generate(tiny_model(), PROMPTS, max_new_tokens=5, num_samples=6, pad_id=0, rng=0)  # new static config: traced
    # one prefill of the 4 prompts (bucketed to 4 rows x 8 tokens), then one-token decode steps on 4*6 rows whose
    # cache holds the prompt part once per prompt (4 rows, not 24)
    assert calls == [("prefill", (4, 8)), ("decode", 24, 4)]


def test_compilations_bounded_by_buckets(monkeypatch):
    model = tiny_model()
    rng = np.random.default_rng(0)
    compiles, real_sample = [], rollout.sample

    def counting_sample(*args, **kwargs):  # the XLA compilations inside each call of the jitted core
        before = compile_count()
        out = real_sample(*args, **kwargs)
        compiles.append(compile_count() - before)
        return out

    monkeypatch.setattr(rollout, "sample", counting_sample)
    shapes, new = set(), []
    for i in range(12):
        n = int(rng.integers(1, 5))
        prompts = [list(rng.integers(3, 60, int(rng.integers(1, 40)))) for _ in range(n)]
        generate(model, prompts, max_new_tokens=3, num_samples=2, pad_id=0, rng=i)
        shape = (rollout.bucket(n, 1), rollout.bucket(max(map(len, prompts))))
        new.append(int(shape not in shapes))
        shapes.add(shape)
    # one compilation the first time a (count bucket, length bucket) is seen, none after
    assert compiles == new and sum(new) == len(shapes) <= 4 * 6  # count buckets (1-4) x length buckets (8-48)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="non-empty"):
        generate(tiny_model(), [[1], []], max_new_tokens=2, pad_id=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model(), [[1]], max_new_tokens=2, pad_id=0, top_p=1.5)
    with pytest.raises(ValueError, match=r"token id 500 is outside the model's vocabulary \[0, 128\)"):
        generate(tiny_model(), [[1, 500]], max_new_tokens=2, pad_id=0)


def test_prompts_split_over_the_mesh_batch_axes_give_the_same_samples():
    from grpo_jax.mesh import make_mesh, shard_model

    mesh = make_mesh(data=8)
    model = shard_model(tiny_model(), mesh)
    prompts = PROMPTS * 2  # 8 prompts: one per device
    kw = dict(max_new_tokens=6, num_samples=2, temperature=1.0, pad_id=0, rng=3)
    replicated, split = generate(model, prompts, **kw), generate(model, prompts, mesh=mesh, **kw)
    # (unplaced prompts are split too once inside: the model keeps its activations split over the batch axes)
    assert split.completion_BxT.shape == (16, 6) and split.completion_BxT.sharding.spec[0] == "data"
    np.testing.assert_array_equal(split.completion_BxT, replicated.completion_BxT)
    np.testing.assert_allclose(split.logprobs_BxT, replicated.logprobs_BxT, atol=1e-5)
