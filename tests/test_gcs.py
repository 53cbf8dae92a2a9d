"""Runs kept in Cloud Storage: `grpo-jax train` and `grpo-jax ablate` with a gs:// run dir, against a real storage
emulator (fake-gcs-server) on localhost, killed with SIGKILL after a checkpoint and rerun with the same command."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load

from grpo_jax.tracking import TIMING_KEYS

from gcs_emulator import Emulator
from loop_helpers import cli_env, tiny_experiment, train_cmd, write_experiment


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    emulator = Emulator(tmp_path_factory.mktemp("gcs"))
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


def bucket_metrics(gcs, run: str) -> list[dict]:
    return [json.loads(line) for line in gcs.read(f"{run}/metrics.jsonl").decode().splitlines()]


def bucket_params(gcs, run: str) -> dict[str, np.ndarray]:
    return load(gcs.read(f"{run}/final/model.safetensors"))


def kill_after_checkpoint(cmd, env, cwd, gcs, marker: str, timeout=300):
    """Start ``cmd``; SIGKILL it as soon as the object ``marker`` is in the bucket."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not gcs.objects(marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert gcs.objects(marker), f"{marker} never appeared (exit code {proc.returncode})"


def no_local_gs_folder(cwd):
    assert not [p for p in cwd.rglob("gs:*")], "a run location went through pathlib: a local gs: folder"


def same_params(a, b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_on_gcs_resumes_after_kill_9_exactly(tmp_path, gcs, cache):
    exp = write_experiment(tmp_path / "exp", tiny_experiment(checkpoint={"every": 2, "export_hf": True}))
    env = cli_env(cache) | gcs.env
    full = subprocess.run(train_cmd(exp, f"gs://{gcs.bucket}/full"), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    kill_after_checkpoint(train_cmd(exp, f"gs://{gcs.bucket}/killed"), env, tmp_path, gcs,
                          "killed/checkpoints/2/commit_success.txt")
    assert not gcs.objects("killed/final/")
    resumed = subprocess.run(train_cmd(exp, f"gs://{gcs.bucket}/killed"), env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["start_step"] >= 2

    names = set(gcs.objects("killed/"))
    for artefact in ("config.yaml", "metrics.jsonl", "checkpoints/6/commit_success.txt", "final/config.json",
                     "final/model.safetensors", "final/tokenizer_config.json"):
        assert f"killed/{artefact}" in names, artefact
    assert any(n.startswith("killed/tb/events.out.tfevents.") for n in names)
    assert yaml.safe_load(gcs.read("killed/config.yaml"))["train"]["steps"] == 6
    rows = bucket_metrics(gcs, "killed")
    assert [r["step"] for r in rows] == list(range(7))
    assert without_timing(rows) == without_timing(bucket_metrics(gcs, "full"))
    same_params(bucket_params(gcs, "killed"), bucket_params(gcs, "full"))

    # grpo-jax eval reads the model from the bucket: a run dir (its final/, report written beside it) or a folder
    cli = [sys.executable, "-m", "grpo_jax.cli", "eval"]
    by_run = subprocess.run([*cli, str(exp), "--run-dir", f"gs://{gcs.bucket}/killed"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert by_run.returncode == 0, by_run.stderr
    report = json.loads(gcs.read("killed/eval.json"))
    assert report["model"] == f"gs://{gcs.bucket}/killed/final" and report["examples"] == 8
    assert report == json.loads(by_run.stdout.splitlines()[-1])
    by_folder = subprocess.run([*cli, f"gs://{gcs.bucket}/full/final", str(exp)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
    assert by_folder.returncode == 0, by_folder.stderr
    assert json.loads(by_folder.stdout.splitlines()[-1])["eval/accuracy"] == report["eval/accuracy"]
    no_local_gs_folder(tmp_path)


def ablate_cmd(folder, out):
    return [sys.executable, "-m", "grpo_jax.cli", "ablate", str(folder), "--quick", "--run-dir", out]


@pytest.mark.slow
def test_ablate_quick_on_gcs_resumes_after_kill_9(tmp_path, gcs, cache):
    cfg = tiny_experiment(warm_start={"target": "{answer}", "sft": {"steps": 4, "batch_size": 8, "warmup_steps": 0}},
                          checkpoint={"every": 2, "export_hf": True}, eval={"num_examples": 8, "batch_prompts": 8})
    folder = write_experiment(tmp_path / "exp", cfg)
    (folder / "ablation.yaml").write_text(yaml.safe_dump({
        "seeds": [0, 1], "quick_seeds": [0], "variants": {"grpo": [], "dr_grpo": ["algo.preset=dr_grpo"]},
        "quick": ["train.steps=4"], "table": ["final:eval/accuracy", "mean:train/loss"],
        "plots": [{"file": "loss.png", "metrics": ["train/loss"]}]}))
    env = cli_env(cache) | gcs.env
    full = subprocess.run(ablate_cmd(folder, f"gs://{gcs.bucket}/ab_full"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    kill_after_checkpoint(ablate_cmd(folder, f"gs://{gcs.bucket}/ab"), env, tmp_path, gcs,
                          "ab/dr_grpo/seed0/checkpoints/2/commit_success.txt")
    again = subprocess.run(ablate_cmd(folder, f"gs://{gcs.bucket}/ab"), env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr

    names = set(gcs.objects("ab/"))
    assert {"ab/results.md", "ab/results.json", "ab/loss.png"} <= names
    assert gcs.read("ab/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dr_grpo |" in gcs.read("ab/results.md").decode()
    # the shared warm start was copied inside the bucket, and both variants' runs are complete and exact
    assert gcs.read("ab/dr_grpo/seed0/warm_start/model.safetensors") == gcs.read(
        "ab/grpo/seed0/warm_start/model.safetensors")
    for variant in ("grpo", "dr_grpo"):
        run = f"ab/{variant}/seed0"
        assert (without_timing(bucket_metrics(gcs, run))
                == without_timing(bucket_metrics(gcs, f"ab_full/{variant}/seed0")))
        same_params(bucket_params(gcs, run), bucket_params(gcs, f"ab_full/{variant}/seed0"))
    no_local_gs_folder(tmp_path)


def test_path_layer_round_trips_through_the_emulator(gcs, monkeypatch):
    """storage.copy_tree / staged / local_copy, and the metrics writer's rewrite-on-flush, in process."""
    for k, v in gcs.env.items():
        monkeypatch.setenv(k, v)
    from grpo_jax import storage
    from grpo_jax.tracking import MetricsWriter, read_metrics

    with storage.staged(f"gs://{gcs.bucket}/layer/a") as local:
        with open(f"{local}/f.txt", "w") as f:
            f.write("hello")
    assert gcs.read("layer/a/f.txt") == b"hello"
    storage.copy_tree(f"gs://{gcs.bucket}/layer/a", f"gs://{gcs.bucket}/layer/b")
    assert open(f"{storage.local_copy(f'gs://{gcs.bucket}/layer/b')}/f.txt").read() == "hello"

    writer = MetricsWriter(f"gs://{gcs.bucket}/layer/run", flush_every_s=3600)
    for step in range(4):
        writer.write(step, {"a": float(step)})
    assert not gcs.objects("layer/run/metrics.jsonl")  # buffered: an object store has no append
    writer.flush()
    writer.truncate_after(2)  # a resume from step 2 keeps lines 0..2, byte for byte
    writer.write(3, {"a": 30.0})
    writer.close()
    assert [(r["step"], r["a"]) for r in read_metrics(f"gs://{gcs.bucket}/layer/run")] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert gcs.read("layer/run/metrics.jsonl").count(b"\n") == 4
    assert [n for n in gcs.objects("layer/run/tb/") if "tfevents" in n]
