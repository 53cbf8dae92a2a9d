"""SFT warm start: the loss is the hand-computed NLL, it falls on a fixed batch, the step compiles once, the
padded layout is what the docs say, and bad settings fail naming the field."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sft
from grpo_jax.config import ConfigError, from_dict
from grpo_jax.data import arith_examples, build_char_tokenizer, render_prompt
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.optim import make_optimizer
from grpo_jax.sft import SFTBatch, SFTConfig, encode_pairs, make_sft_step, run_sft, sft_loss
from grpo_jax.tracking import compile_count

V = 32


def tiny_model(vocab=V, seed=0):
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True)
    return build_model(cfg, rngs=nnx.Rngs(seed))


def test_loss_is_uniform_nll_log_v_when_logits_are_all_zero():
    model = tiny_model()
    model.model.embed[...] = jnp.zeros_like(model.model.embed[...])  # tied head: every logit is 0
    tokens = jnp.array([[0, 0, 5, 6, 7, 1]])
    attn = jnp.array([[0, 0, 1, 1, 1, 1]])
    loss, metrics = jax.jit(sft_loss)(model, tokens, attn, jnp.array([[0, 0, 0, 1, 1, 1]]))
    np.testing.assert_allclose(float(loss), np.log(V), rtol=1e-6)  # -log(1/32) per target token
    assert int(metrics["target_tokens"]) == 3


def test_loss_equals_mean_nll_of_full_log_softmax():
    model = tiny_model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, V, size=(3, 9)).astype(np.int32)
    attn = np.ones((3, 9), bool)
    attn[1, :3] = False  # left padding
    attn[2, 7:] = False  # right padding
    loss_mask = np.zeros((3, 9), bool)
    loss_mask[0, 5:] = loss_mask[1, 3:] = loss_mask[2, 4:] = True  # row 1: its first real token (no predecessor)
    # is marked too and must not count; row 2: marked pad positions 7, 8 must not count
    logits = np.asarray(model(jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(attn)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, tokens[b, t]] for b, t in
           [(0, 5), (0, 6), (0, 7), (0, 8), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 5), (2, 6)]]
    loss, metrics = jax.jit(sft_loss)(model, tokens, attn, loss_mask)
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    assert int(metrics["target_tokens"]) == 12


def test_step_compiles_once_per_shape():
    model = tiny_model()
    graphdef, params = nnx.split(model, nnx.Param)
    cfg = SFTConfig(steps=10, warmup_steps=0)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    opt_state = optimizer.init(params)
    step = make_sft_step(graphdef, optimizer)
    rng = np.random.default_rng(0)

    def batch(B, T):
        tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
        return SFTBatch(jnp.asarray(tokens), jnp.ones((B, T), bool), jnp.asarray(rng.random((B, T)) < 0.5))

    batches = [batch(4, 8) for _ in range(3)] + [batch(4, 12)]  # built first: their eager ops compile too
    compiles = []
    for b in batches:
        before = compile_count()
        params, opt_state, metrics = step(params, opt_state, b)
        compiles.append(compile_count() - before)
    # one compilation for [4, 8], none for its repeats; the new shape [4, 12] is one more: the counter does count
    assert compiles == [1, 0, 0, 1]
    assert step._cache_size() == 2  # the jitted step holds one executable per shape
    assert set(metrics) == {"loss", "target_tokens", "grad_norm"} and np.isfinite(float(metrics["loss"]))


def test_weight_decay_skips_norms_and_biases():
    model = tiny_model()
    params = nnx.split(model, nnx.Param)[1]
    cfg = SFTConfig(steps=10, warmup_steps=0, weight_decay=0.5)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    layers = updates["model"]["layers"]
    for name in ("attn_norm", "mlp_norm", "q_bias", "k_bias", "v_bias"):
        assert not np.any(layers[name][...]), name
    assert not np.any(updates["model"]["norm"][...])
    # zero gradients: the whole update is -lr * weight_decay * param on decayed params
    np.testing.assert_allclose(layers["q"][...], -3e-3 * 0.5 * params["model"]["layers"]["q"][...], rtol=1e-6)
    assert np.any(updates["model"]["embed"][...])


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def arith(tok, n, seed=0):
    return [ex | {"prompt": render_prompt(tok, ex["question"])} for ex in arith_examples(n, 1, seed)]


def answer(ex):
    return " " + ex["answer"]


def test_pairs_are_left_padded_prompts_then_targets(tok):
    examples = [{"prompt": "ab", "answer": "7"}, {"prompt": "abcd", "answer": "-12"}]
    data = encode_pairs(tok, examples, answer, max_len=9)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pad, eos = tok.pad_token_id, tok.eos_token_id
    # P = 4 (longest prompt), C = 5 (" -12" + eos): [pad pad a b | " " 7 eos pad pad] and [a b c d | " " - 1 2 eos]
    assert data.tokens_BxT.tolist() == [[pad, pad, *ids("ab"), *ids(" 7"), eos, pad, pad],
                                        [*ids("abcd"), *ids(" -12"), eos]]
    assert data.attn_mask_BxT.astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 9]
    assert data.loss_mask_BxT.astype(int).tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"max_len=8 is too small.*need 9"):
        encode_pairs(tok, examples, answer, max_len=8)


def test_run_sft_lowers_the_loss_on_a_fixed_batch_and_compiles_once(tok, monkeypatch):
    examples = arith(tok, 8)
    model = tiny_model(vocab=len(tok))
    before_params = jax.tree.map(np.array, nnx.split(model, nnx.Param)[1])
    steps, real_make_sft_step = [], sft.make_sft_step

    def recording_make_sft_step(graphdef, optimizer):  # counts the compilations inside each call of the step
        jitted = real_make_sft_step(graphdef, optimizer)

        def call(*args):
            before = compile_count()
            out = jitted(*args)
            steps.append(compile_count() - before)
            return out

        return call

    monkeypatch.setattr(sft, "make_sft_step", recording_make_sft_step)
    cfg = SFTConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, max_len=32, log_every=10)
    trained, history = run_sft(model, tok, examples, cfg, completion_fn=answer)
    assert steps == [1] + [0] * 29  # the step compiled on step 1 only
    assert [h["step"] for h in history] == list(range(1, 31))
    losses = [h["loss"] for h in history]
    assert losses[0] > 4.0  # ~ log(260) = 5.56 at init
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
    assert history[0]["lr"] == 0.0 and history[3]["lr"] == pytest.approx(1e-2)
    assert all(h["target_tokens"] == sum(len(answer(ex)) + 1 for ex in examples) for h in history)
    assert all(h["tokens_per_s"] > 0 for h in history)
    # the caller's model is untouched (its buffers were not donated) and the returned one differs
    jax.tree.map(np.testing.assert_array_equal, before_params, nnx.split(model, nnx.Param)[1])
    assert not np.array_equal(trained.model.embed[...], model.model.embed[...])


def test_run_sft_rejects_bad_examples(tok):
    cfg = SFTConfig(steps=2, warmup_steps=0)
    with pytest.raises(ValueError, match="example 1 has no 'prompt'"):
        run_sft(tiny_model(260), tok, [{"prompt": "a", "answer": "1"}, {"answer": "2"}], cfg, completion_fn=answer)
    with pytest.raises(ValueError, match="examples is empty"):
        run_sft(tiny_model(260), tok, [], cfg, completion_fn=answer)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be >= 1"),
    ("batch_size", -1, "batch_size must be >= 1"),
    ("log_every", 0, "log_every must be >= 1"),
    ("lr", 0.0, "lr must be > 0"),
    ("max_grad_norm", -1.0, "max_grad_norm must be > 0"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("warmup_steps", 200, r"warmup_steps must be in \[0, steps=200\)"),
    ("max_len", 1, "max_len must be >= 2"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"SFTConfig.{message}"):
        SFTConfig(**{field: value})


def test_config_layer_is_strict_about_keys_and_types():
    cfg = from_dict(SFTConfig, {"steps": 50, "lr": "1e-3"})
    assert cfg == dataclasses.replace(SFTConfig(), steps=50, lr=1e-3)
    with pytest.raises(ConfigError, match="stepz: unknown key"):
        from_dict(SFTConfig, {"stepz": 50})
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        from_dict(SFTConfig, {"batch_size": 1.5})
