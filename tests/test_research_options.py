"""The bias-fix and measurement options as the trainer uses them, by hand: mixed difficulty levels, warm-start tails,
row-capped group sizing and its history, ragged running moments, the KL multi-scale batch, the micro-batch gradient
spread and the compiled-memory figures."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.advantages import AdvantageConfig, RunningMoments, compute_advantages_with_state
from grpo_jax.data import DataConfig, build_splits
from grpo_jax.experiment import WarmStartSection
from grpo_jax.group_size import DynamicGroupConfig, GroupHistory, allocate_group_sizes
from grpo_jax.sft import SFTConfig
from grpo_jax.tracking import compiled_stats, tree_bytes


def test_mixed_levels_are_interleaved_and_labelled():
    cfg = DataConfig(task="arith", levels=(1, 3), ops="+", num_examples=5, template="{expression}=")
    train = build_splits(cfg).train
    assert [ex["level"] for ex in train] == [1, 3, 1, 3, 1]  # 3 + 2 examples, level by level
    assert all(len(ex["expression"].split(" + ")) == (2 if ex["level"] == 1 else 3) for ex in train)
    assert {ex["level"] for ex in build_splits(DataConfig(task="arith", difficulty=2)).train} == {2}
    for bad, match in (({"levels": (1, 1)}, "distinct levels"), ({"levels": (5,)}, "distinct levels"),
                       ({"levels": (1, 2), "digits": (2, 1)}, "levels or digits"),
                       ({"task": "gsm8k", "source": "x.jsonl", "levels": (1,)}, "synthetic tasks")):
        with pytest.raises(ValueError, match=match):
            DataConfig(**{"task": "arith", **bad})


def test_warm_start_tail_is_seeded_per_question_and_keeps_the_flaw_choice():
    examples = [{"question": f"q{i}", "answer": str(i), "units_slip_answer": str(i + 1)} for i in range(200)]
    plain = WarmStartSection(sft=SFTConfig(seed=1), flawed_target="{units_slip_answer}", flawed_fraction=0.5)
    tailed = WarmStartSection(sft=SFTConfig(seed=1), flawed_target="{units_slip_answer}", flawed_fraction=0.5,
                              tail_max=3, tail_char="~")
    a, b = plain.completion_fn(examples), tailed.completion_fn(examples)
    for ex in examples:
        assert b(ex).rstrip("~") == a(ex)  # same flawed questions; the tail only follows the answer
    tails = [len(b(ex)) - len(a(ex)) for ex in examples]
    assert set(tails) == {0, 1, 2, 3} and 30 < tails.count(0) < 70  # uniform over 0..3 (50 expected)
    assert [b(ex) for ex in examples] == [tailed.completion_fn(examples)(ex) for ex in examples]
    # flawed targets take their own tail range: here the wrong answers are the long ones
    long_wrong = WarmStartSection(sft=SFTConfig(seed=1), flawed_target="{units_slip_answer}", flawed_fraction=0.5,
                                  tail_max=1, flawed_tail_max=6).completion_fn(examples)
    flawed = {ex["question"] for ex in examples if a(ex) != ex["answer"]}
    tails = {q: len(long_wrong(ex)) - len(a(ex)) for ex in examples for q in [ex["question"]]}
    assert {tails[q] for q in tails if q not in flawed} == {0, 1} and {tails[q] for q in flawed} == set(range(7))
    with pytest.raises(ValueError, match="tail_char must be one non-digit"):
        WarmStartSection(sft=SFTConfig(), tail_max=2, tail_char="7")


def test_allocation_with_a_row_cap_by_hand():
    # w = (.6, .1); L = 10; budget 1000 tokens pays for any size, but only 10 rows: after 2 + 2, the next 6 entries
    # by level k/w: prompt 0's k = 3..8 (5 .. 13.3) all precede prompt 1's k = 3 (30) -> (8, 2)
    sizes = allocate_group_sizes([0.5, 0.0], token_budget=1000, mean_length_P=[10, 10], min_size=2, max_size=16,
                                 max_samples=10)
    np.testing.assert_array_equal(sizes, [8, 2])
    with pytest.raises(ValueError, match="max_samples=3 cannot hold min_size=2"):
        allocate_group_sizes([0.5, 0.5], token_budget=100, mean_length_P=[1, 1], min_size=2, max_size=4, max_samples=3)


def test_group_history_by_hand():
    cfg = DynamicGroupConfig(min_size=2, max_size=6, key="level", momentum=0.5)
    hist = GroupHistory(cfg)
    exs = [{"level": 1}, {"level": 2}]
    # nothing seen: p = .5 for both at max_new_tokens = 4 -> a tie: 8 rows, 32 tokens -> (4, 4)
    np.testing.assert_array_equal(hist.sizes(exs, 8, 4), [4, 4])
    # level 1 solved 3/3 (lengths 2, 2, 2), level 2 1/5 (lengths 4, 4, 4, 4, 8); mean length 30/8
    hist.update(exs, np.array([3, 5]), np.array([1, 1, 1, 1, 0, 0, 0, 0], bool), np.array([2, 2, 2, 4, 4, 4, 4, 8]))
    assert hist.stats == {"1": [1.0, 2.0], "2": [0.2, 4.8]} and hist.mean_length == 30 / 8
    # a second update averages with momentum .5
    hist.update(exs[:1], np.array([2]), np.array([0, 1], bool), np.array([4, 2]))
    assert hist.stats["1"] == [0.75, 2.5]
    # w = (sqrt(.75·.25) + .1, sqrt(.2·.8) + .1) = (.533, .5); lengths (2.5, 4.8); budget 8 rows x mean 3 = 24:
    # base 2·2.5 + 2·4.8 = 14.6, left 9.4; levels 3/.533 = 5.6 (level 1, left 6.9), 3/.5 = 6 (level 2, left 2.1),
    # 4/.533 = 7.5 costs 2.5 > 2.1 and is skipped -> (3, 3)
    np.testing.assert_array_equal(hist.sizes(exs, 8, 4), [3, 3])
    again = GroupHistory.from_json(cfg, hist.to_json())
    assert again.stats == hist.stats and again.mean_length == hist.mean_length
    with pytest.raises(ValueError, match="key='level' is not an example field"):
        hist.sizes([{"question": "q"}], 4, 4)


def test_running_moments_skip_padding_rows():
    cfg = AdvantageConfig(baseline="running", scale="none")
    ids = jnp.array([0, 0, 1, 1, -1, -1])
    r = jnp.array([1.0, 0.0, 1.0, 1.0, 7.0, 7.0])  # the padding rows' 7s must not enter the running mean
    adv, state = compute_advantages_with_state(r, None, cfg, RunningMoments.zeros(), group_ids_B=ids, num_groups=2)
    np.testing.assert_allclose([state.mean, state.var], [0.75, 0.1875], rtol=1e-6)
    np.testing.assert_allclose(adv, [0.25, -0.75, 0.25, 0.25, 0, 0], rtol=1e-6)


def test_kl_multiscale_batch_by_hand():
    from types import SimpleNamespace

    from grpo_jax.algorithms import Scored, build_algorithm
    from grpo_jax.algorithms.base import rollout_batch
    from grpo_jax.experiment import load_experiment

    from loop_helpers import tiny_experiment, write_experiment

    def cfg_with(tmp, **adv):
        cfg = tiny_experiment(algo={"preset": "grpo", "loss": {"beta": 0.0}, "advantage": adv},
                              rollout={"group_size": 2})
        return load_experiment(write_experiment(tmp, cfg))

    # one prompt token, 3 completion tokens; row 1 has 2 valid tokens
    ro = SimpleNamespace(prompt_BxP=jnp.array([[5], [5]]), prompt_mask_BxP=jnp.ones((2, 1), bool),
                         completion_BxT=jnp.array([[1, 2, 3], [1, 2, 0]]),
                         completion_mask_BxT=jnp.array([[1, 1, 1], [1, 1, 0]], bool),
                         logprobs_BxT=jnp.array([[-1.0, -2, -1], [-1, -1, 0]]))
    ref = jnp.array([[0.0, -1.5, -1.5, -1.0], [0.0, -2, -1, 0]])
    adv_B = jnp.array([1.0, -1.0])
    scored = Scored(rollout=ro, rewards_B=np.zeros(2), keep_B=jnp.ones(2, bool), n_valid=2)

    def build_batch(cfg):  # the GRPO algorithm's token terms on the rollout's batch (trainer's logp = rollout's)
        batch = rollout_batch(scored)
        return build_algorithm(cfg).with_token_terms(batch, adv_B, ref, batch.old_logp_BxS, scored)
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    batch = build_batch(cfg_with(tmp / "a", token_alpha=0.5))
    # k1 = logp - ref on completion tokens: row 0 (-1 + 1.5, -2 + 1.5, -1 + 1) = (.5, -.5, 0), row 1 (1, 0);
    # return-to-go: row 0 (0, -.5, 0), row 1 (1, 0); u = -return-to-go; A_it = A_i + .5·u
    np.testing.assert_allclose(batch.adv, [[0, 1.0, 1.25, 1.0], [0, -1.5, -1.0, 0]], atol=1e-6)
    assert batch.ref_logp_BxS is None  # β = 0: the reference served only the token term
    batch = build_batch(cfg_with(tmp / "b", token_alpha=0.5, token_norm="group"))
    # group normalisation of u over the 5 valid tokens (0, .5, 0, -1, 0): mean -.1, squared deviations
    # .01 + .36 + .01 + .81 + .01 = 1.2, population std sqrt(1.2/5)
    z = lambda x: (x + 0.1) / (math.sqrt(1.2 / 5) + 1e-6)  # noqa: E731
    np.testing.assert_allclose(batch.adv[0, 1:], [1 + 0.5 * z(0), 1 + 0.5 * z(0.5), 1 + 0.5 * z(0)], rtol=1e-5)
    np.testing.assert_allclose(batch.adv[1, 1:3], [-1 + 0.5 * z(-1), -1 + 0.5 * z(0)], rtol=1e-5)


def _tiny_step(grad_variance: bool, micro: int):
    from flax import nnx

    from grpo_jax.algorithms import make_algorithm
    from grpo_jax.losses import LossConfig
    from grpo_jax.models import ModelConfig, build_model
    from grpo_jax.optim import OptimConfig, make_optimizer
    from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step

    model = build_model(ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=16, intermediate_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = make_optimizer(OptimConfig(lr=1e-3), 1)
    cfg = StepConfig(micro_batches=micro, grad_variance=grad_variance)
    step = make_train_step(graphdef, opt, cfg, make_algorithm(loss=LossConfig(agg="token-mean", beta=0.0)))

    def batch_of(tokens, adv):
        B, S = tokens.shape
        loss_mask = jnp.broadcast_to(jnp.arange(S) >= 2, (B, S))
        return Batch(tokens_BxS=tokens, attn_mask_BxS=jnp.ones((B, S), bool), loss_mask_BxS=loss_mask,
                     old_logp_BxS=jnp.zeros((B, S)), ref_logp_BxS=None, adv=adv)

    return lambda tokens, adv: step(init_train_state(jax.tree.map(jnp.copy, params), opt), batch_of(tokens, adv))[1]


def test_gradient_spread_by_hand():
    step = _tiny_step(True, 2)
    half = jnp.array([[1, 2, 3, 4, 5], [1, 3, 2, 6, 7]])
    adv = jnp.array([1.0, -1.0])
    # two identical micro-batches: e_1 = e_2 = g, so the spread is 0
    m = step(jnp.concatenate([half, half]), jnp.concatenate([adv, adv]))
    assert float(m["grad_rel_var"]) < 1e-5  # float32 cancellation in K²Σ||g_k||² - K||g||² only
    # the second micro-batch carries zero advantage (so zero gradient) but the same tokens in the denominator:
    # e_1 = 2g, e_2 = 0 -> var = ||2g - g||² + ||0 - g||² = 2||g||², rel_var = 2
    m = step(jnp.concatenate([half, half]), jnp.concatenate([adv, 0 * adv]))
    np.testing.assert_allclose(m["grad_rel_var"], 2.0, rtol=1e-4)
    np.testing.assert_allclose(m["grad_var"], 2.0 * float(m["grad_norm"]) ** 2, rtol=1e-4)
    assert "grad_var" not in _tiny_step(False, 2)(jnp.concatenate([half, half]), jnp.concatenate([adv, adv]))
    from grpo_jax.train_step import StepConfig

    with pytest.raises(ValueError, match="needs micro_batches >= 2"):
        StepConfig(grad_variance=True)


def test_compiled_stats_by_hand():
    x = jnp.ones((1000,), jnp.float32)
    mem = compiled_stats(jax.jit(lambda a: a * 2.0), x, name="m")
    assert mem["memory/m/argument_bytes"] == 4000 and mem["memory/m/output_bytes"] == 4000
    assert mem["memory/m/peak_bytes"] >= 8000
    # donating the input lets the output reuse it: the alias is subtracted from the peak
    donated = compiled_stats(jax.jit(lambda a: a * 2.0, donate_argnums=0), x, name="m")
    assert donated["memory/m/peak_bytes"] == mem["memory/m/peak_bytes"] - 4000
    assert tree_bytes({"a": jnp.ones((3, 2)), "b": jnp.ones(5, jnp.bfloat16)}) == 3 * 2 * 4 + 5 * 2
