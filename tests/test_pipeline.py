"""Rollouts ahead of the updates (``rollout.mode``): the version schedule, depth 0 == sync, staleness and mismatch
logged, config errors. (Exact resume per mode: ``test_loop.test_resume_after_kill_9_is_exact``.)"""
import threading
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo_jax.config import ConfigError, from_dict
from grpo_jax.data import OrderState
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.loop import train
from grpo_jax.pipeline import RolloutPipeline, sampler_slots
from grpo_jax.tracking import TIMING_KEYS

from loop_helpers import metrics, tiny_experiment


def fake_pipeline(depth: int, start: int = 0, snapshots=None):
    calls = []

    def produce(params, examples, step, version):
        calls.append((step, version, params, threading.current_thread().name))
        time.sleep(0.01)
        return (step, version)

    examples = [{"i": i} for i in range(40)]
    copy = lambda p: {k: v.copy() for k, v in p.items()}  # noqa: E731  (the weight sync)
    pipe = RolloutPipeline(produce, copy, depth=depth, start=start, order=OrderState(), snapshots=snapshots or {},
                           splits_train=examples, batch_prompts=4, data_seed=0)
    return pipe, calls


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batch_n_is_sampled_with_the_params_of_max_0_n_minus_k_updates(depth):
    pipe, calls = fake_pipeline(depth)
    for step in range(6):
        pipe.fill(step, {"w": np.full(2, float(step))})  # θ_step: the params after `step` updates
        assert pipe.take(step) == (step, max(0, step - depth))
        order, kept = pipe.checkpoint_state(step + 1)  # what a checkpoint after step + 1 updates holds
        assert [float(p["w"][0]) for p in kept] == sampler_slots(depth, step + 1)
        assert order == pipe.orders[step + 1]
        assert len(pipe.snapshots) <= depth + 1  # copies are dropped once no batch needs them
    pipe.close()
    ran = sorted(c[:2] for c in calls)  # batches 0-5 and whichever of 6 .. 5 + depth started before close()
    assert ran == [(m, max(0, m - depth)) for m in range(len(ran))] and 6 <= len(ran) <= 6 + depth
    assert all(float(c[2]["w"][0]) == c[1] for c in calls)  # each batch really got its version's params
    assert {c[3] for c in calls} == {"grpo-jax-rollout_0"}  # generated in the background thread
    assert sampler_slots(2, 5) == [3, 4] and sampler_slots(2, 1) == [0, 0] and sampler_slots(0, 5) == []


def test_a_resumed_pipeline_uses_the_saved_sampler_params_and_data_order():
    whole, _ = fake_pipeline(2)
    for step in range(3):
        whole.fill(step, {"w": np.full(2, float(step))})
        whole.take(step)
    order, kept = whole.checkpoint_state(3)
    resumed, calls = fake_pipeline(2, start=3, snapshots=dict(zip(sampler_slots(2, 3), kept)))
    resumed.orders[3] = order
    resumed.fill(3, {"w": np.full(2, 3.0)})
    assert resumed.take(3) == (3, 1)
    assert resumed.futures[4].result() == (4, 2) and resumed.futures[5].result() == (5, 3)
    assert sorted((c[0], c[1], float(c[2]["w"][0])) for c in calls) == [(3, 1, 1.0), (4, 2, 2.0), (5, 3, 3.0)]
    whole.close()
    resumed.close()


def run(tmp_path, name, trainer_mesh=None, **rollout):
    cfg = tiny_experiment(rollout=rollout, mesh=trainer_mesh or {"num_devices": 1},
                          train={"steps": 3, "batch_prompts": 4}, eval={"num_examples": 0},
                          rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1},
                          checkpoint={"every": 3, "async_save": False, "export_hf": True})
    train(from_dict(ExperimentConfig, cfg), tmp_path / name, show_progress=False)
    return [r for r in metrics(tmp_path / name) if "train/loss" in r], load_file(
        str(tmp_path / name / "final" / "model.safetensors"))


def test_async_with_max_staleness_0_reproduces_the_sync_run_and_staler_samples_show_mismatch(tmp_path):
    sync, p_sync = run(tmp_path, "sync")
    zero, p_zero = run(tmp_path, "zero", mode="async", max_staleness=0)
    assert [r["rollout/staleness"] for r in zero] == [0] * 3
    assert [r["rollout/version"] for r in zero] == [0, 1, 2]
    for a, b in zip(sync, zero):
        for key in a:
            if not key.startswith(TIMING_KEYS):
                same = a[key] == b[key] if isinstance(a[key], str) else abs(a[key] - b[key]) <= 1e-6
                assert same, (a["step"], key, a[key], b[key])
    assert all(np.abs(p_sync[k] - p_zero[k]).max() <= 1e-6 for k in p_sync)

    stale, _ = run(tmp_path, "stale", mode="one_step_off")
    assert [r["rollout/version"] for r in stale] == [0, 0, 1]
    assert [r["rollout/staleness"] for r in stale] == [0, 1, 1]
    assert all(r["time/weight_sync_s"] >= 0 and r["time/rollout_wait_s"] >= 0 for r in stale)
    # on-policy batches: the trainer recomputes the sampler's log-probs; a batch one update old differs
    assert all(r["train/mismatch/abs_logp_diff"] < 1e-5 for r in sync)
    assert stale[0]["train/mismatch/abs_logp_diff"] < 1e-4
    assert all(r["train/mismatch/abs_logp_diff"] > 1e-4 for r in stale[1:])


@pytest.mark.parametrize("override, match", [
    ({"mode": "later"}, "rollout.mode"),
    ({"max_staleness": 2}, "applies to rollout.mode=async only"),
    ({"mode": "async", "max_staleness": -1}, "max_staleness"),
    ({"mode": "one_step_off", "dynamic_group": {}}, "needs rollout.mode=sync"),
])
def test_rollout_mode_config_errors(override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        from_dict(ExperimentConfig, tiny_experiment(rollout=override))


def test_a_bfloat16_sampler_is_measured_against_the_float32_trainer(tmp_path):
    """(A float32 sampler's mismatch is < 1e-5: test_async_with_max_staleness_0_reproduces_the_sync_run...)"""
    rows, _ = run(tmp_path, "bf16", dtype="bfloat16")
    for r in rows:  # on-policy batches: the whole difference is the sampler's bfloat16 arithmetic
        assert r["train/mismatch/abs_logp_diff"] > 1e-4 and r["train/mismatch/kl_k3"] > 0
        assert r["train/mismatch/ratio_max"] > 1 > r["train/mismatch/ratio_min"]


def test_a_sampler_on_its_own_devices_samples_what_the_trainers_mesh_samples(tmp_path, monkeypatch):
    """rollout.mesh: the trainer on devices 0-3 (data 4), the sampler on 4-7 (data 2 x tensor 2). The weights are
    resharded onto the sampler's devices for every batch (timed) and the samples come back onto the trainer's."""
    from grpo_jax import sampling

    devices = []
    sample = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda run, params, *a: (
        devices.append({d.id for x in jax.tree.leaves(params) for d in x.devices()}), sample(run, params, *a))[1])
    shared, p_shared = run(tmp_path, "shared", trainer_mesh={"num_devices": 4})
    own, p_own = run(tmp_path, "own", trainer_mesh={"num_devices": 4}, mesh={"first_device": 4, "data": 2, "tensor": 2})
    assert devices == [{0, 1, 2, 3}] * 3 + [{4, 5, 6, 7}] * 3
    assert all(r["time/weight_sync_s"] > 0 for r in own) and all("time/weight_sync_s" not in r for r in shared)
    for a, b in zip(shared, own):
        assert a["length/mean"] == b["length/mean"] and a["reward/total/mean"] == b["reward/total/mean"]
        for key in ("train/loss", "train/grad_norm", "train/mismatch/abs_logp_diff"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert all(np.abs(p_shared[k] - p_own[k]).max() <= 1e-5 for k in p_shared)
    assert all(r["train/mismatch/abs_logp_diff"] < 1e-5 for r in own)  # on-policy: the sharding changes nothing


@pytest.mark.parametrize("mesh, match", [({"first_device": 8}, "rollout.mesh: first_device=8"),
                                         ({"first_device": 4, "num_devices": 5}, "num_devices=5 from first_device=4")])
def test_sampler_mesh_outside_the_devices_is_one_config_error(tmp_path, mesh, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path, "bad", trainer_mesh={"num_devices": 4}, mesh=mesh)
