"""PPO's separate critic (algo.ppo.critic: separate): the same value function gives the head variant's values, GAE,
value loss and value-head gradient; its gradient never reaches the policy; it trains, exports without the critic,
and resumes with both models and both optimizer states."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_algos import VARYING, initial_params, mesh1, ppo_batch, tiny_policy

from grpo_jax.algorithms import make_algorithm
from grpo_jax.config import ConfigError, from_dict
from grpo_jax.critic import add_critic_model, value_fn
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.losses import LossConfig, PPOConfig
from grpo_jax.optim import OptimConfig, critic_labels, make_optimizer
from grpo_jax.train_step import StepConfig, init_train_state, make_train_step


def separate_like_head():
    """(head policy, separate policy) whose critics are the same function: the separate critic's decoder is a copy
    of the policy's and its value head has the head variant's weights."""
    head = tiny_policy(value_head=True)
    sep = tiny_policy(value_head=False)
    add_critic_model(sep, mesh1())
    sep.critic.value_head.w[...] = head.value_head.w[...]
    sep.critic.value_head.b[...] = head.value_head.b[...]
    return head, sep


def step(model, objective, lr=1.0):
    graphdef, params = nnx.split(model)
    opt = optax.sgd(lr)  # the param change is exactly -lr·grad
    state, m = make_train_step(graphdef, opt, StepConfig(), objective)(init_train_state(params, opt), ppo_batch())
    return m, jax.tree.map(lambda a, c: a - c, state.params, params)


def test_the_same_value_function_gives_the_head_variants_values_gae_and_value_loss():
    head, sep = separate_like_head()
    b = ppo_batch()
    v_head = value_fn(nnx.graphdef(head))(nnx.state(head), b.tokens_BxS, b.attn_mask_BxS)
    v_sep = value_fn(nnx.graphdef(sep))(nnx.state(sep), b.tokens_BxS, b.attn_mask_BxS)
    np.testing.assert_allclose(v_sep, v_head, atol=1e-6)  # so assemble's GAE and returns are the same too
    assert np.abs(np.asarray(v_head)).max() > 0

    kw = dict(kind="ppo", loss=LossConfig(agg="token-mean", beta=0.0))
    m_head, d_head = step(head, make_algorithm(ppo=PPOConfig(vf_coef=0.5, value_clip=0.1), **kw))
    m_sep, d_sep = step(sep, make_algorithm(ppo=PPOConfig(vf_coef=0.5, value_clip=0.1, critic="separate"), **kw))
    assert {"loss", "vf_loss", "clip_frac"} <= set(m_head)
    for k in [k for k in m_head if k != "grad_norm"]:  # (the gradients differ: no shared trunk)
        np.testing.assert_allclose(m_sep[k], m_head[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for name in ("w", "b"):  # the value head's gradient: the same loss through the same hidden states
        np.testing.assert_allclose(d_sep["critic"]["value_head"][name][...], d_head["value_head"][name][...],
                                   rtol=1e-4, atol=1e-7)
    # the policy's gradient is the surrogate's alone: the head variant's with vf_coef = 0 (no shared trunk)
    _, d_pg = step(tiny_policy(value_head=True), make_algorithm(ppo=PPOConfig(vf_coef=0.0), **kw))
    np.testing.assert_allclose(d_sep["model"]["embed"][...], d_pg["model"]["embed"][...], atol=1e-7)
    assert np.abs(d_sep["critic"]["model"]["embed"][...]).max() > 0  # the critic's own decoder learns


def test_the_critic_has_its_own_optimizer():
    _, sep = separate_like_head()
    params = nnx.state(sep)
    labels = jax.tree.leaves(critic_labels(params))
    assert labels.count("critic") == len(jax.tree.leaves(nnx.state(sep.critic)))
    assert labels.count("policy") == len(labels) - labels.count("critic")
    opt = make_optimizer(OptimConfig(lr=1e-3, max_grad_norm=None), 10, critic=OptimConfig(lr=1e-1, max_grad_norm=None))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    u = jax.tree.leaves(updates)  # Adam's first step is -lr·sign(g): each part moves by its own learning rate
    for name, lr in (("policy", 1e-3), ("critic", 1e-1)):
        moved = np.concatenate([np.abs(np.asarray(x)).ravel() for x, label in zip(u, labels) if label == name])
        np.testing.assert_allclose(moved, lr, rtol=1e-5)


def test_separate_critic_config_errors():
    with pytest.raises(ValueError, match="set critic: separate"):
        PPOConfig(critic_lr=1e-5)
    with pytest.raises(ValueError, match="'head' or 'separate'"):
        PPOConfig(critic="shared")


SEPARATE = {"preset": "ppo", "ppo": {"critic": "separate", "critic_lr": 3e-3}}


def run(tmp_path, name):
    from grpo_jax.loop import train

    from loop_helpers import metrics, tiny_experiment

    cfg = tiny_experiment(rewards=VARYING, mesh={"data": 1, "num_devices": 1}, eval={"num_examples": 0},
                          algo=SEPARATE, train={"steps": 4, "batch_prompts": 4},
                          checkpoint={"every": 1, "keep": 4, "async_save": False, "export_hf": True})
    summary = train(from_dict(ExperimentConfig, cfg), tmp_path / name, show_progress=False)
    return metrics(tmp_path / name)[1:], summary


def test_separate_critic_trains_exports_the_policy_alone_and_resumes_both_models(tmp_path):
    full, _ = run(tmp_path, "run")
    assert all(np.isfinite(r["train/vf_loss"]) and r["train/vf_loss"] > 0 for r in full)
    final, init = load_file(str(tmp_path / "run" / "final" / "model.safetensors")), initial_params(tmp_path)
    assert final.keys() == init.keys()  # no critic in the exported policy
    for k in ("3", "4"):  # as if killed after step 2's checkpoint
        shutil.rmtree(tmp_path / "run" / "checkpoints" / k)
    resumed, summary = run(tmp_path, "run")
    assert summary["start_step"] == 2 and [r["step"] for r in resumed] == [1, 2, 3, 4]
    # step 4's value loss follows update 3 of the critic, which reads its restored Adam moments
    for key in ("train/vf_loss", "train/loss", "train/grad_norm"):
        np.testing.assert_allclose(resumed[-1][key], full[-1][key], rtol=1e-6, err_msg=key)
    again = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(np.array_equal(again[k], final[k]) for k in final)


def test_separate_critic_from_yaml(tmp_path):
    from loop_helpers import tiny_experiment

    cfg = from_dict(ExperimentConfig, tiny_experiment(algo=SEPARATE))
    assert cfg.algo.ppo.critic == "separate" and cfg.algo.ppo.critic_lr == 3e-3
    with pytest.raises(ConfigError, match="critic"):
        from_dict(ExperimentConfig, tiny_experiment(algo={"preset": "ppo", "ppo": {"critic_path": "x"}}))
