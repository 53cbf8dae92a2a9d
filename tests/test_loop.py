"""The trainer end to end: exact resume after kill -9, SIGTERM, bounded compilations, bad configs, NaN stop."""
import json
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo_jax import cli
from grpo_jax.tracking import TIMING_KEYS

from loop_helpers import cli_env, metrics, run_train, tiny_experiment, train_cmd, write_experiment


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


def final_params(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("rollout", [  # sync: test_gcs.py's kill -9 test (the same run, on a gs:// run folder)
    {"mode": "one_step_off"},
    {"mode": "async", "max_staleness": 2, "dtype": "bfloat16", "mesh": {"first_device": 4, "data": 2, "tensor": 2}}],
    ids=["one_step_off", "async-2-bf16-sampler-on-its-own-mesh"])
def test_resume_after_kill_9_is_exact(tmp_path, cache, rollout):
    """kill -9 after the checkpoint at step 2, rerun: the same metrics and final params as an uninterrupted run. With
    rollouts ahead of the updates the checkpoint holds the sampler params of the batches in flight, which the rerun
    regenerates (grpo_jax.pipeline); the last case keeps them in bfloat16 on the sampler's devices 4-7 (the trainer
    on 0-3)."""
    mesh, devices = ({"num_devices": 4}, 8) if "mesh" in rollout else ({}, 1)
    exp = write_experiment(tmp_path / "exp", tiny_experiment(checkpoint={"every": 2, "export_hf": True},
                                                             rollout=rollout, mesh=mesh))
    full = tmp_path / "full"
    assert run_train(exp, full, cache, devices=devices).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(exp, killed), env=cli_env(cache, devices), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "2").exists() and not (killed / "final").exists()
    resumed = run_train(exp, killed, cache, devices=devices)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["start_step"] >= 2
    assert without_timing(metrics(killed)) == without_timing(metrics(full))
    a, b = final_params(full), final_params(killed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path, cache):
    exp = write_experiment(tmp_path / "exp", tiny_experiment(train={"steps": 200}, checkpoint={"every": 1000}))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(exp, run_dir), env=cli_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = int(err.strip().splitlines()[-1].rsplit(" ", 1)[-1])
    assert saved >= 2 and (run_dir / "checkpoints" / str(saved)).exists()


def varying_prompts_run(tmp_path, steps: int, layout: str = "padded", **rollout) -> list[dict]:
    """A run (``train.layout``) on a gsm8k-format local file with questions from 5 to ~90 characters (several length
    buckets)."""
    rng = np.random.default_rng(0)
    rows = [{"question": "x" * int(n), "answer": f"#### {i}"} for i, n in enumerate(rng.integers(5, 90, 64))]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_experiment(data={"task": "gsm8k", "source": str(data), "held_out_fraction": 0.0},
                          train={"steps": steps, "batch_prompts": 2, "layout": layout}, checkpoint={"every": 100})
    cfg["data"].pop("difficulty"), cfg["data"].pop("num_examples")
    cfg["rollout"] |= rollout
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig
    from grpo_jax.loop import train

    train(from_dict(ExperimentConfig, cfg), tmp_path / "run", show_progress=False)
    return metrics(tmp_path / "run")[1:]


def test_compilations_stop_growing_with_varying_prompt_lengths(tmp_path):
    rows = varying_prompts_run(tmp_path, 8)
    seen, before = set(), rows[0]["compiles"]
    for r in rows:
        new_bucket = r["shape/prompt_len"] not in seen
        seen.add(r["shape/prompt_len"])
        if not new_bucket:
            assert r["compiles"] == before, f"step {r['step']} recompiled for an already seen bucket"
        before = r["compiles"]
    assert 2 <= len(seen) < len(rows)  # the test really exercised several buckets, and repeats of them


def test_fixed_prompt_len_never_recompiles_after_the_first_step(tmp_path):
    """rollout.fixed_prompt_len: 30 steps over prompts of 5-90 tokens, one shape, no compilation after step 1;
    every step logs its phase times and FLOP rates."""
    rows = varying_prompts_run(tmp_path, 30, fixed_prompt_len=True)
    assert len(rows) == 30 and {r["shape/prompt_len"] for r in rows} == {96}  # bucket(longest prompt, 89 chars)
    assert [r["compiles"] for r in rows] == [rows[0]["compiles"]] * 30
    for key in ("time/rollout_s", "time/train_s", "throughput/rollout_tflops", "throughput/update_tflops"):
        assert all(r[key] > 0 for r in rows), key


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.loss.betta=0.1", "algo.loss.betta: unknown key"),
        ("train.steps=many", "train.steps: expected an integer"),
        ("rollout.group_size=1", "group_size=1 with advantage estimator 'group'"),
        ("train.micro_batches=3", "must split into train.micro_batches=3"),
    ],
)
def test_bad_config_fails_before_compute_with_one_line(tmp_path, capsys, override, message):
    exp = write_experiment(tmp_path / "exp", tiny_experiment())
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(exp), "--run-dir", str(run_dir), override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_batch_not_divisible_by_mesh_fails_before_compute(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", tiny_experiment(train={"batch_prompts": 3}))
    assert cli.main(["train", str(exp), "--run-dir", str(tmp_path / "run")]) == 2  # 12 rows on 8 devices
    assert "divisible by the mesh's data*fsdp = 8" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", tiny_experiment(
        optim={"lr": 1e38, "max_grad_norm": None}, train={"steps": 6, "batch_prompts": 2},
        checkpoint={"every": 1}, algo={"preset": "grpo", "loss": {"beta": 0.0}},
        rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1}))
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(exp), "--run-dir", str(run_dir)]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient" in err and "last good checkpoint is intact" in err
    from grpo_jax.checkpoint import Checkpointer

    steps = Checkpointer(run_dir / "checkpoints").steps()
    assert steps and max(steps) < 6


def test_loop_on_8_device_mesh_matches_one_device(tmp_path):
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig
    from grpo_jax.loop import train

    base = tiny_experiment(train={"steps": 1, "batch_prompts": 4}, eval={"num_examples": 0},
                           rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1})
    runs = {}
    for name, mesh in {"one": {"data": 1, "num_devices": 1}, "fsdp4x2": {"data": 1, "fsdp": 4, "tensor": 2},
                       "data2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}.items():
        train(from_dict(ExperimentConfig, {**base, "mesh": mesh}), tmp_path / name, show_progress=False)
        runs[name] = metrics(tmp_path / name)[-1]
    assert runs["one"]["train/grad_norm"] > 0.0  # (the on-policy loss value itself is ~0: advantages sum to 0)
    for name in ("fsdp4x2", "data2x2x2"):
        assert runs[name]["length/mean"] == runs["one"]["length/mean"]  # same samples
        for key in ("train/loss", "train/kl", "train/grad_norm", "reward/total/mean"):
            assert abs(runs[name][key] - runs["one"][key]) <= 1e-5 * max(1.0, abs(runs["one"][key])), (name, key)
