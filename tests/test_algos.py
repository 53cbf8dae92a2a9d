"""algo.kind ppo / dpo / hybrid: value head alignment, exact micro-batching of each objective, a few loop steps."""
import dataclasses
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from grpo_jax.algorithms import ALGORITHMS, make_algorithm
from grpo_jax.config import ConfigError, from_dict
from grpo_jax.critic import add_value_head, token_values
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.losses import DPOConfig, LossConfig, PPOConfig
from grpo_jax.mesh import make_mesh
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.train_step import StepConfig, init_train_state, make_train_step

from loop_helpers import metrics, tiny_experiment
from test_train_step import batch as step_batch

ONE_DEVICE = {"data": 1, "num_devices": 1}
VARYING = {"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1}


def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def tiny_policy(value_head: bool):
    cfg = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    if value_head:
        add_value_head(model, mesh1())
        model.value_head.w[...] = 0.3 * jax.random.normal(jax.random.key(1), (32,))
        model.value_head.b[...] = jnp.float32(0.25)
    return model


def test_token_values_read_the_hidden_state_before_each_token():
    model = tiny_policy(value_head=True)
    model.value_head.w[...] = jnp.zeros(32).at[0].set(2.0).at[1].set(-1.0)
    model.value_head.b[...] = jnp.float32(0.5)
    h = jnp.zeros((1, 4, 32)).at[0, :, 0].set(jnp.array([1.0, 2.0, 3.0, 4.0])).at[0, :, 1].set(1.0)
    # V(s_t) = h_{t-1}·w + b = 2·h0 - h1 + 0.5: t=1 -> 2-1+.5 = 1.5, t=2 -> 3.5, t=3 -> 5.5; t=0 has no state
    np.testing.assert_allclose(token_values(model, h, jnp.ones((1, 4), bool)), [[0.0, 1.5, 3.5, 5.5]])
    # a masked token and the one after it (whose state includes a pad) are 0, as token_logprobs does
    np.testing.assert_allclose(token_values(model, h, jnp.array([[1, 1, 0, 1]], bool)), [[0.0, 1.5, 0.0, 0.0]])


def run_step(step_cfg, objective, b, value_head, lr=1.0):
    graphdef, params = nnx.split(tiny_policy(value_head))
    opt = optax.sgd(lr)  # the param change is exactly -lr·grad
    state, m = make_train_step(graphdef, opt, step_cfg, objective)(init_train_state(params, opt), b)
    return m, jax.tree.map(lambda a, c: a - c, state.params, params)


def ppo_batch(seed=0):
    b = step_batch(seed, token_adv=True)
    rng = np.random.default_rng(seed + 1)
    mask = np.asarray(b.loss_mask_BxS)
    old_v = np.where(mask, rng.normal(0, 0.5, mask.shape), 0).astype(np.float32)
    ret = np.where(mask, rng.normal(0, 1.0, mask.shape), 0).astype(np.float32)
    return b.replace(old_values_BxS=jnp.asarray(old_v), returns_BxS=jnp.asarray(ret))


def pair_batch(seed=0):
    # B = 8 rows, 2 groups of 4: group 0 best row 1, worst row 3; group 1 best row 6, worst row 4
    return step_batch(seed).replace(rewards_B=jnp.array([0.5, 1.0, 0.2, 0.0, -1.0, 0.3, 2.0, 0.3]))


CASES = {
    "ppo": (dict(kind="ppo", ppo=PPOConfig(vf_coef=0.5, value_clip=0.1)), ppo_batch, True),
    "dpo": (dict(kind="dpo", dpo=DPOConfig(beta=0.5), group_size=4), pair_batch, False),
    "hybrid": (dict(kind="hybrid", dpo=DPOConfig(beta=0.5, alpha=0.3), group_size=4), pair_batch, False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_micro_batches_give_the_full_batch_update(name, num_iterations):
    kw, make_batch, value_head = CASES[name]
    objective = make_algorithm(loss=LossConfig(agg="token-mean", beta=0.05), **kw)
    base = StepConfig(num_iterations=num_iterations)
    lr = 1.0 if num_iterations == 1 else 0.01  # μ = 2: the second update's gradient is taken after a small step
    m1, d1 = run_step(base, objective, make_batch(), value_head, lr)
    m2, d2 = run_step(dataclasses.replace(base, micro_batches=2), objective, make_batch(), value_head, lr)
    assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 0
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    if value_head:
        assert m1["vf_loss"] > 0 and np.abs(d1["value_head"]["w"][...]).max() > 0
    else:
        assert m1["dpo_pairs"] == 2


def test_dpo_loss_of_the_step_matches_the_pairs_by_hand():
    """The dpo step's loss at θ = the batch's policy is the mean over both pairs of -log σ(β·h_p); here the
    reference log-probs are set to the policy's own, so h_p = 0 and the loss is log 2 with accuracy 0."""
    from grpo_jax.models import token_logprobs

    b = pair_batch()
    model = tiny_policy(value_head=False)
    own = token_logprobs(model, b.tokens_BxS, b.attn_mask_BxS)
    m, _ = run_step(StepConfig(), make_algorithm(**CASES["dpo"][0]), b.replace(ref_logp_BxS=own), False)
    np.testing.assert_allclose(m["loss"], math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose([m["dpo_reward_margin"], m["dpo_reward_accuracy"]], [0.0, 0.0], atol=1e-6)


def test_pair_micro_batches_must_hold_whole_groups():
    objective = make_algorithm("dpo", dpo=DPOConfig(), group_size=8)
    with pytest.raises(ValueError, match="must hold whole groups of group_size=8"):
        run_step(StepConfig(micro_batches=2), objective, pair_batch(), False)


@pytest.mark.parametrize(
    "algo, train, message",
    [
        ({"preset": "dpo", "dpo": {"bta": 1}}, {}, "algo.dpo.bta: unknown key"),
        ({"preset": "dpo", "dpo": {"beta": 0.0}}, {}, "beta must be > 0"),
        ({"preset": "hybrid", "dpo": {"alpha": 2.0}}, {}, "alpha must be in [0, 1]"),
        ({"preset": "ppo", "ppo": {"lam": 1.5}}, {}, "lam must be in [0, 1]"),
        ({"kind": "ppx"}, {}, f"kind='ppx' is not an algorithm; choose one of {sorted(ALGORITHMS)}"),
        ({"preset": "dpo"}, {"micro_batches": 3}, "train.micro_batches=3 must divide train.batch_prompts=4"),
        ({"preset": "ppo"}, {"kl_in_reward": True}, "kl_in_reward is implemented for algo.kind=grpo only"),
    ],
)
def test_config_errors(algo, train, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(ExperimentConfig, tiny_experiment(algo=algo, train=train))


def run_loop(tmp_path, name, **sections):
    from grpo_jax.loop import train

    cfg = tiny_experiment(rewards=VARYING, mesh=ONE_DEVICE, eval={"num_examples": 0},
                          checkpoint={"every": 1, "async_save": False, "export_hf": True}, **sections)
    summary = train(from_dict(ExperimentConfig, cfg), tmp_path / name, show_progress=False)
    return metrics(tmp_path / name)[1:], summary


def initial_params(tmp_path):
    from grpo_jax.models import save_hf
    from grpo_jax.run_setup import build_policy, load_tokenizer

    cfg = from_dict(ExperimentConfig, tiny_experiment(mesh=ONE_DEVICE))
    save_hf(build_policy(cfg, load_tokenizer(cfg.model), mesh1()), tmp_path / "init")
    return load_file(str(tmp_path / "init" / "model.safetensors"))


@pytest.mark.parametrize("preset, own_metrics", [("ppo", ["vf_loss", "clip_frac"]),
                                                 ("dpo", ["dpo_loss", "dpo_reward_accuracy", "dpo_pairs"]),
                                                 ("hybrid", ["pg_loss", "kl", "dpo_loss", "dpo_reward_margin"])])
def test_each_kind_trains_a_few_steps(tmp_path, preset, own_metrics):
    rows, _ = run_loop(tmp_path, preset, algo={"preset": preset}, train={"steps": 2, "batch_prompts": 4})
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        assert all(np.isfinite(r[f"train/{k}"]) for k in own_metrics), sorted(r)
    if preset != "ppo":
        assert all(r["train/dpo_pairs"] > 0 for r in rows)
    final, init = load_file(str(tmp_path / preset / "final" / "model.safetensors")), initial_params(tmp_path)
    assert final.keys() == init.keys() and any(not np.array_equal(final[k], init[k]) for k in final)


def test_ppo_resume_restores_the_value_head(tmp_path):
    full, _ = run_loop(tmp_path, "run", algo={"preset": "ppo"}, train={"steps": 3, "batch_prompts": 4})
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3")  # as if killed after step 2's checkpoint
    resumed, summary = run_loop(tmp_path, "run", algo={"preset": "ppo"}, train={"steps": 3, "batch_prompts": 4})
    # step 3's value loss depends on the value head trained in steps 1-2: equal only if it was restored
    assert summary["start_step"] == 2 and [r["step"] for r in resumed] == [1, 2, 3]
    np.testing.assert_allclose(resumed[-1]["train/vf_loss"], full[-1]["train/vf_loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed[-1]["train/loss"], full[-1]["train/loss"], rtol=1e-6)
