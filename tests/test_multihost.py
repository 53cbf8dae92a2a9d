"""Multi-host on one machine: two `grpo-jax train` processes on localhost (2 CPU devices each, coordinator on
127.0.0.1) train exactly like one process with 4 devices, stop together on SIGTERM, and resume from their shared
Orbax checkpoint."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo_jax import cli
from grpo_jax.config import ConfigError

from loop_helpers import ROOT, cli_env, metrics, tiny_experiment, train_cmd, write_experiment

# fsdp=2 splits params, optimizer state, batch and checkpoint shards across the two processes (devices 0,1 belong
# to process 0 and 2,3 to process 1); tensor=2 splits within each process.
MESH = {"data": 1, "fsdp": 2, "tensor": 2}
COMPARED = ("train/loss", "train/kl", "train/grad_norm", "reward/total/mean", "length/mean")


def test_distributed_args_from_env():
    assert cli.distributed_args({}) is None
    assert cli.distributed_args({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None  # one worker: single process
    assert cli.distributed_args({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == {}  # jax detects the pod itself
    assert cli.distributed_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}) == {}  # ... or the SLURM/MPI job
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert cli.distributed_args(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID missing"):
        cli.distributed_args({**env, "JAX_PROCESS_ID": ""})
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS missing"):
        cli.distributed_args({**env, "JAX_COORDINATOR_ADDRESS": ""})
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        cli.distributed_args({**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match="must be integers"):
        cli.distributed_args({**env, "JAX_NUM_PROCESSES": "two"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(cache, devices: int, **extra) -> dict:
    """CPU devices for one process, the suite's other XLA flags kept (LLVM optimisation off: tests/conftest.py); the
    single- and the multi-process runs compile with the same flags, so they are still compared like for like."""
    return cli_env(cache, devices) | dict(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra)


def launch(exp, run_dir, cache, processes: int, devices_each: int) -> list[subprocess.Popen]:
    port = free_port()
    cluster = lambda i: {} if processes == 1 else dict(  # noqa: E731
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    return [subprocess.Popen(train_cmd(exp, run_dir), env=env_for(cache, devices_each, **cluster(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(procs, timeout: float = 120) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; a hang (e.g. one process waiting in a collective for a dead peer)
    kills them all and fails the test instead of blocking it."""
    deadline, out = time.time() + timeout, []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.time()))
            out.append((p.returncode, o, e))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"processes still running after {timeout}s: {[p.communicate()[1][-2000:] for p in procs]}")
    return out


def final_params(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_sigterm(tmp_path):
    cache = tmp_path / "xla_cache"
    exp = write_experiment(tmp_path / "exp", tiny_experiment(
        mesh=MESH, train={"steps": 4, "batch_prompts": 4}, eval={"num_examples": 0},
        algo={"preset": "grpo", "loss": {"beta": 0.04, "agg": "token-mean"}},  # on-policy loss != 0 (lengths vary)
        checkpoint={"every": 4, "async_save": False, "export_hf": True},
        rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1}))

    single = tmp_path / "single"
    (rc, out, err), = finish(launch(exp, single, cache, processes=1, devices_each=4))
    assert rc == 0, err[-3000:]

    multi = tmp_path / "multi"
    procs = launch(exp, multi, cache, processes=2, devices_each=2)
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (multi / "metrics.jsonl").exists() and metrics(multi):  # the step-0 line: the SIGTERM handler is set
            break
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)  # only one host is told; both must save the same step and stop
    stopped = finish(procs)
    assert [rc for rc, _, _ in stopped] == [143, 143], [e[-3000:] for _, _, e in stopped]
    saved = {int(re.search(r"saved a checkpoint at step (\d+)", e).group(1)) for _, _, e in stopped}
    assert len(saved) == 1 and 1 <= min(saved) < 4 and (multi / "checkpoints" / str(min(saved))).exists()

    resumed = finish(launch(exp, multi, cache, processes=2, devices_each=2))
    assert [rc for rc, _, _ in resumed] == [0, 0], [e[-3000:] for _, _, e in resumed]
    for _, out, _ in resumed:
        assert json.loads(out.splitlines()[-1])["start_step"] == min(saved)

    a, b = metrics(single), metrics(multi)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # one line per step: only process 0 writes
    assert a[1]["train/grad_norm"] > 0
    for ra, rb in zip(a[1:], b[1:]):
        for key in COMPARED:
            assert abs(ra[key] - rb[key]) <= 1e-5, (ra["step"], key, ra[key], rb[key])
    pa, pb = final_params(single), final_params(multi)
    assert pa.keys() == pb.keys() and all(np.allclose(pa[k], pb[k], rtol=0, atol=1e-5) for k in pa)
