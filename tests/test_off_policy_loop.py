"""The off-policy correction and the rollout/trainer mismatch metrics wired into the train step and the loop
(issue 16): mismatch/* every step (hand-computed from a perturbed rollout), the proximal log-probs of a μ > 1 step,
micro-batch exactness, the YAML/override shape and the kinds that refuse it."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax.algorithms import make_algorithm
from grpo_jax.algorithms.grpo import GRPO
from grpo_jax.config import ConfigError
from grpo_jax.losses import LossConfig, OffPolicyConfig
from grpo_jax.train_step import StepConfig

from loop_helpers import metrics, tiny_experiment, write_experiment
from test_train_step import batch, run, tiny

LN = np.log
TIS = OffPolicyConfig(weight="truncate", cap=1.5, reject="mask", reject_low=0.6, reject_high=1.8)


def model_logp(graphdef, params, b):
    """The tiny model's log-probs of the batch: what the trainer computes at the start of the step."""
    algo = make_algorithm("grpo")
    return np.asarray(algo.forward(nnx.merge(graphdef, params), b, temperature=1.0, chunk_size=128,
                                   with_entropy=False)[0])


def rollout_batch(shift=None, seed=0):
    """``batch()`` whose rollout log-probs are the model's own minus ``shift`` (d = trainer - rollout = shift)."""
    b = batch(seed)
    mask = np.asarray(b.loss_mask_BxS)
    d = np.random.default_rng(seed + 1).normal(0, 0.8, mask.shape) if shift is None else np.full(mask.shape, shift)
    d = np.where(mask, d, 0.0).astype(np.float32)
    return b.replace(old_logp_BxS=np.where(mask, model_logp(*tiny(), b) - d, 0.0).astype(np.float32)), d, mask


def expected_mismatch(d, mask, off: OffPolicyConfig):
    """mismatch/* by hand: r = exp(d) over the n valid tokens; truncated: r > cap; masked: r outside [lo, hi]."""
    r, n, seqs = np.exp(d[mask]), mask.sum(), np.any(mask, axis=1).sum()
    over = np.where(mask, d > LN(off.cap), False)
    out = np.where(mask, (d < LN(off.reject_low)) | (d > LN(off.reject_high)), False)
    return {"mismatch/abs_logp_diff": np.abs(d[mask]).mean(), "mismatch/kl_k3": (r - 1 - LN(r)).mean(),
            "mismatch/ratio_max": r.max(), "mismatch/ratio_min": r.min(),
            "mismatch/truncated_token_frac": over.sum() / n, "mismatch/masked_token_frac": out.sum() / n,
            "mismatch/truncated_seq_frac": over.any(1).sum() / seqs,
            "mismatch/masked_seq_frac": out.any(1).sum() / seqs}


@pytest.mark.parametrize("off, num_iterations", [(None, 1), (None, 2), (TIS, 2)])
def test_mismatch_metrics_are_those_of_the_params_at_the_start_of_the_step(off, num_iterations):
    b, d, mask = rollout_batch()
    state, m, _ = run(StepConfig(num_iterations=num_iterations), b, loss=LossConfig(off_policy=off))
    moved = np.abs(model_logp(tiny()[0], state.params, b) - model_logp(*tiny(), b))[mask].max()
    assert moved > 0.05  # SGD with lr 1: a later update's mismatch would be far from the first's
    expected = expected_mismatch(d, mask, off or OffPolicyConfig(cap=2.0, reject="mask", reject_low=0.5))
    assert 0.05 < expected["mismatch/masked_token_frac"] < 0.95  # the draw exercises both sides
    for k, v in expected.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
    if off is None:
        assert "mismatch/weight_mean" not in m  # no weight is applied
    else:
        keep = mask & (d >= LN(off.reject_low)) & (d <= LN(off.reject_high))
        np.testing.assert_allclose(m["mismatch/weight_mean"], np.where(keep, np.minimum(np.exp(d), off.cap), 0).sum()
                                   / mask.sum(), rtol=1e-4)


def sgd_by_hand(b, loss: LossConfig, lr: float) -> dict[str, nnx.State]:
    """The params' change after the two SGD updates of a μ = 2 step, by the choice of π_old. proximal: the first
    update on-policy (π_old = sg(π_θ)), the second with π_old the log-probs at the start of the step; rollout: the
    rollout's in both (the step without a correction, as before issue 16)."""
    graphdef, p0 = tiny()
    algo = make_algorithm("grpo", loss=loss)
    dens = algo.denominators(b)

    @jax.jit
    def sgd(params, old):  # old None: on-policy
        def f(p):
            logp = algo.forward(nnx.merge(graphdef, p), b, temperature=1.0, chunk_size=128, with_entropy=False)[0]
            return algo.micro_loss(logp, jax.lax.stop_gradient(logp) if old is None else old, None, b, dens)[0]
        return jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(f)(params))

    prox, rollout = model_logp(graphdef, p0, b), b.old_logp_BxS
    ends = {"proximal": sgd(sgd(p0, None), prox), "rollout": sgd(sgd(p0, rollout), rollout)}
    return {k: jax.tree.map(lambda a, c: a - c, p2, p0) for k, p2 in ends.items()}


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("off", [None, OffPolicyConfig(weight="truncate", cap=2.0)])
def test_second_update_uses_the_proximal_logprobs_only_with_a_correction(off):
    b, _, _ = rollout_batch(shift=-0.3)  # the rollout's log-probs 0.3 above the trainer's: ρ = π_prox/μ = e^-0.3
    loss = LossConfig(beta=0.0, off_policy=off)
    # lr 0: both updates see the start params; with a correction π_old = π_prox, so every ratio r = π_θ/π_old is 1
    _, m, _ = run(StepConfig(num_iterations=2), b, optim=optax.sgd(0.0), loss=loss)
    if off is None:  # π_old = the rollout's (as before issue 16): r = e^-0.3 < 1 - 0.2, the low clip is active
        np.testing.assert_allclose(m["ratio_mean"], np.exp(-0.3), rtol=1e-5)
        assert float(m["clip_frac_low"]) > 0
    else:
        assert float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0
        np.testing.assert_allclose(m["mismatch/weight_mean"], np.exp(-0.3), rtol=1e-5)  # TIS weight min(ρ, 2)
    lr = 0.5
    _, _, delta = run(StepConfig(num_iterations=2), b, optim=optax.sgd(lr), loss=loss)
    by_hand = sgd_by_hand(b, loss, lr)
    assert max_diff(by_hand["proximal"], by_hand["rollout"]) > 1e-3  # the two choices of π_old are far apart
    assert max_diff(delta, by_hand["rollout" if off is None else "proximal"]) < 2e-5


@pytest.mark.parametrize("micro_batches, grad_variance", [(2, False), (4, True)])  # strided, contiguous split
def test_micro_batches_equal_the_full_batch_with_a_correction(micro_batches, grad_variance):
    b, _, _ = rollout_batch()
    loss, cfg = LossConfig(off_policy=TIS), StepConfig(num_iterations=2)
    _, m_full, d_full = run(cfg, b, optim=optax.sgd(0.5), loss=loss)
    micro = dataclasses.replace(cfg, micro_batches=micro_batches, grad_variance=grad_variance)
    _, m_micro, d_micro = run(micro, b, optim=optax.sgd(0.5), loss=loss)
    assert max_diff(d_full, d_micro) < 2e-6 and max_diff(d_full, jax.tree.map(np.zeros_like, d_full)) > 1e-3
    keys = ["loss", "grad_norm", "clip_frac", "ratio_mean"] + [k for k in m_full if k.startswith("mismatch/")]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_allclose(m_micro[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_measuring_the_mismatch_leaves_the_update_bit_identical(monkeypatch):
    """μ = 2 on 2 micro-batches: the first update (which measures) and the second (which does not) both unchanged."""
    b, _, _ = rollout_batch()
    cfg = StepConfig(num_iterations=2, micro_batches=2)
    state, m, _ = run(cfg, b, optim=optax.sgd(0.5))
    with monkeypatch.context() as patch:
        patch.setattr(GRPO, "rollout_mismatch", lambda self, logp, mb: {})
        state_off, m_off, _ = run(cfg, b, optim=optax.sgd(0.5))
    assert "mismatch/kl_k3" in m and "mismatch/kl_k3" not in m_off
    assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state_off)))
    assert all(bool(m[k] == v) for k, v in m_off.items())


def load(tmp_path, *overrides, **sections):
    from grpo_jax.experiment import load_experiment

    return load_experiment(write_experiment(tmp_path / "exp", tiny_experiment(**sections)), list(overrides))


def test_off_policy_from_yaml_and_dotted_overrides(tmp_path):
    cfg = load(tmp_path, "algo.loss.off_policy.weight=decoupled", "algo.loss.off_policy.cap=3")
    assert cfg.algo.loss.off_policy == OffPolicyConfig(weight="decoupled", cap=3.0)
    assert load(tmp_path).algo.loss.off_policy is None
    yaml_cfg = load(tmp_path, algo={"preset": "grpo", "loss": {"off_policy": {"level": "sequence", "reject": "mask"}}})
    assert yaml_cfg.algo.loss.off_policy == OffPolicyConfig(level="sequence", reject="mask")
    assert load(tmp_path, "algo.loss.off_policy.weight=none", algo={"preset": "ppo"}).algo.loss.off_policy is not None
    with pytest.raises(ConfigError, match="off_policy.level"):
        load(tmp_path, "algo.loss.off_policy.level=row")
    with pytest.raises(ConfigError, match="off_policy"):
        load(tmp_path, "algo.loss.off_policy.weight=truncate", algo={"preset": "dpo"})


def test_tiny_run_logs_the_mismatch_every_step(tmp_path):
    """A float32 sampler and trainer with the same params differ only numerically: every mismatch is tiny. The
    correction with μ = 2 on packed rows over an 8-device mesh (without a correction, on one device:
    ``test_pipeline.test_async_with_max_staleness_0_reproduces_the_sync_run...``)."""
    overrides = ("algo.loss.off_policy.weight=truncate", "train.num_iterations=2", "train.layout=packed",
                 "mesh.data=4", "mesh.fsdp=2", "mesh.num_devices=8")
    from grpo_jax.loop import train

    sections = dict(rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1},
                    mesh={"data": 1, "num_devices": 1}, eval={"num_examples": 0},
                    checkpoint={"every": 10, "async_save": False}, train={"steps": 2, "batch_prompts": 4,
                                                                          "micro_batches": 2})
    train(load(tmp_path, *overrides, **sections), tmp_path / "run", show_progress=False)
    rows = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["train/mismatch/abs_logp_diff"] < 1e-4 and r["train/mismatch/kl_k3"] < 1e-4
        assert abs(r["train/mismatch/ratio_max"] - 1) < 1e-4 and abs(r["train/mismatch/ratio_min"] - 1) < 1e-4
        assert r["train/mismatch/truncated_token_frac"] == 0.0 and r["train/mismatch/masked_seq_frac"] == 0.0
        assert "train/mismatch/weight_mean" in r
