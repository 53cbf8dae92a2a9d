"""The KL that ``train.kl_in_reward`` and ``algo.advantage.token_alpha`` put into GRPO's advantages is the trainer's
KL(π_θ‖π_ref): ``loop.assemble`` recomputes the rollout's log-probs under the current params (``Passes.policy``)
instead of trusting the sampler's (bf16, top-k/top-p, staleness), which stay the loss's behaviour policy."""
import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.advantages import RunningMoments
from grpo_jax.algorithms import Passes, Scored, build_algorithm
from grpo_jax.config import from_dict
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.loop import assemble
from grpo_jax.mesh import make_mesh
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.run_setup import logprob_fn

from loop_helpers import tiny_experiment

P, T = 2, 4  # prompt and completion lengths; 2 groups of 2 rows
REWARDS = np.array([1.0, 0.0, 2.0, 2.0])  # dr_grpo's A_i = r_i - mean_G = (.5, -.5, 0, 0)
ADV_B = np.array([0.5, -0.5, 0.0, 0.0])


@dataclasses.dataclass(frozen=True)
class State:  # the fields of RunState that ``assemble`` reads
    train: SimpleNamespace
    ref_params: nnx.State
    moments: RunningMoments


def algorithm(**sections):
    cfg = tiny_experiment(algo={"preset": "dr_grpo", **sections.pop("algo")}, rollout={"group_size": 2},
                          train={"batch_prompts": 2, **sections.pop("train", {})})
    return build_algorithm(from_dict(ExperimentConfig, cfg))


def setup():
    """(run, state, scored, the trainer's log-probs [B, S], the reference's [B, S]); the rollout's log-probs are
    the trainer's + 0.3·noise, the reference is the policy with its params scaled by 0.8."""
    model = build_model(ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=16, intermediate_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ref_params = jax.tree.map(lambda x: 0.8 * x, params)
    k1, k2 = jax.random.split(jax.random.key(0))
    tokens = jax.random.randint(k1, (4, P + T), 1, 16)
    mask_BxT = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    attn = jnp.concatenate([jnp.ones((4, P), bool), mask_BxT], axis=1)
    fn = logprob_fn(graphdef, 1.0, 128)
    pol, ref = np.asarray(fn(params, tokens, attn)), np.asarray(fn(ref_params, tokens, attn))
    sampler = jnp.where(mask_BxT, pol[:, P:] + 0.3 * jax.random.normal(k2, (4, T)), 0.0)
    ro = SimpleNamespace(prompt_BxP=tokens[:, :P], prompt_mask_BxP=attn[:, :P], completion_BxT=tokens[:, P:],
                         completion_mask_BxT=mask_BxT, logprobs_BxT=sampler)
    scored = Scored(rollout=ro, rewards_B=REWARDS, keep_B=jnp.ones(4, bool), n_valid=4)
    rs = State(train=SimpleNamespace(params=params), ref_params=ref_params, moments=RunningMoments.zeros())
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run = lambda alg: SimpleNamespace(algorithm=alg, ref_logprobs=fn, policy_logprobs=fn, critic_values=None,  # noqa: E731
                                      mesh=mesh, reference_params=lambda rs: rs.ref_params)
    return run, rs, scored, pol, ref


def kl_return_to_go(logp, ref, mask):
    """u_it = -Σ_{t'>=t} (logp_it' - ref_it') over the completion tokens, by a reversed cumulative sum."""
    k1 = np.where(mask, logp - ref, 0.0)
    return -np.where(mask, np.cumsum(k1[:, ::-1], axis=1)[:, ::-1], 0.0)


def test_kl_in_reward_and_token_alpha_use_the_trainers_logprobs():
    run, rs, scored, pol, ref = setup()
    sampler = np.concatenate([np.zeros((4, P)), np.asarray(scored.rollout.logprobs_BxT)], axis=1)
    mask = np.concatenate([np.zeros((4, P), bool), np.asarray(scored.rollout.completion_mask_BxT)], axis=1)
    for alg, beta_or_alpha, keeps_ref in ((algorithm(algo={"loss": {"beta": 0.05}}, train={"kl_in_reward": True}),
                                           0.05, False),
                                          (algorithm(algo={"loss": {"beta": 0.04}, "advantage": {"token_alpha": 0.5}}),
                                           0.5, True)):
        assert alg.needs_policy_logprobs
        batch, _, _ = assemble(run(alg), rs, scored)
        # A_it = A_i + c·u_it (kl_in_reward: c = β; token_alpha with token_norm none: c = α), u from logp = π_θ
        want = np.where(mask, ADV_B[:, None] + beta_or_alpha * kl_return_to_go(pol, ref, mask), 0.0)
        from_sampler = np.where(mask, ADV_B[:, None] + beta_or_alpha * kl_return_to_go(sampler, ref, mask), 0.0)
        np.testing.assert_allclose(np.asarray(batch.adv), want, atol=1e-5)
        assert np.abs(want - from_sampler).max() > 1e-2  # the perturbed rollout log-probs would give another A_it
        np.testing.assert_array_equal(np.asarray(batch.old_logp_BxS), sampler.astype(np.float32))  # μ of the loss
        assert (batch.ref_logp_BxS is not None) == keeps_ref


def test_only_the_kl_token_terms_ask_for_the_policy_pass():
    assert not algorithm(algo={"loss": {"beta": 0.04}}).needs_policy_logprobs
    assert not build_algorithm(from_dict(ExperimentConfig, tiny_experiment(algo={"preset": "ppo"}))
                               ).needs_policy_logprobs
    run, rs, scored, _, _ = setup()
    alg = algorithm(algo={"loss": {"beta": 0.05}}, train={"kl_in_reward": True})
    with pytest.raises(ValueError, match="needs the trainer's log-probs"):
        alg.assemble(scored, Passes(reference=lambda t, m: run(alg).ref_logprobs(rs.ref_params, t, m)),
                     RunningMoments.zeros())
