"""launch/tpu_vm.sh, checked through --dry-run: the printed gcloud commands, remote scripts and argument errors.

The script runs from a copy inside tmp_path (with an experiments/arith folder) and with a fake `gcloud` first on
PATH that records any call, so nothing here needs or touches a real gcloud.
"""

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "launch" / "tpu_vm.sh"
ENV = {"TPU_NAME": "my-tpu", "TPU_ZONE": "us-central2-b"}


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "launch").mkdir()
    shutil.copy(SCRIPT, tmp_path / "launch" / "tpu_vm.sh")
    (tmp_path / "experiments" / "arith").mkdir(parents=True)
    (tmp_path / "experiments" / "arith" / "config.yaml").write_text("{}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud_called\nexit 1\n')
    gcloud.chmod(0o755)
    return tmp_path


def launch(repo, *args, env=ENV, path=None):
    full_env = {"PATH": path or f"{repo / 'bin'}:{os.environ['PATH']}", "HOME": str(repo), **env}
    return subprocess.run(["bash", str(repo / "launch" / "tpu_vm.sh"), *args], capture_output=True, text=True,
                          env=full_env, cwd=repo, timeout=30)


def dry_run(repo, command, *args, env=ENV):
    """Run COMMAND --dry-run ARGS; return the printed commands, each split into words as a shell would."""
    proc = launch(repo, command, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (repo / "gcloud_called").exists(), "--dry-run ran gcloud"
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def flag(words, name):
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
    assert len(values) == 1, (name, words)
    return values[0]


def test_script_parses_and_is_executable():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_create_passes_type_version_zone_project_and_spot(repo):
    [cmd] = dry_run(repo, "create", "--accelerator-type", "v4-16", "--version=tpu-ubuntu2204-base",
                    "--project", "my-proj", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert flag(cmd, "zone") == "us-central2-b" and flag(cmd, "project") == "my-proj"
    assert flag(cmd, "accelerator-type") == "v4-16" and flag(cmd, "version") == "tpu-ubuntu2204-base"
    assert "--spot" in cmd and "--preemptible" not in cmd


@pytest.mark.parametrize("accel, version", [("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
                                            ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
                                            ("v6e-8", "v2-alpha-tpuv6e")])
def test_version_follows_the_accelerator_type_unless_given(repo, accel, version):
    [cmd] = dry_run(repo, "create", "--name", "x", "--zone", "z", "--accelerator-type", accel)
    assert cmd[5] == "x" and flag(cmd, "zone") == "z" and flag(cmd, "version") == version
    [cmd] = dry_run(repo, "create", "--accelerator-type", accel, "--version", "my-image")
    assert flag(cmd, "version") == "my-image"


def test_flags_come_from_env_and_flags_win(repo):
    env = {**ENV, "TPU_TYPE": "v5litepod-8", "TPU_VERSION": "v2-alpha-tpuv5-lite", "TPU_PROJECT": "env-proj"}
    [cmd] = dry_run(repo, "create", "--preemptible", "--zone", "us-west4-a", env=env)
    assert flag(cmd, "accelerator-type") == "v5litepod-8" and flag(cmd, "version") == "v2-alpha-tpuv5-lite"
    assert flag(cmd, "project") == "env-proj" and flag(cmd, "zone") == "us-west4-a"
    assert "--preemptible" in cmd and "--spot" not in cmd


def test_project_is_left_to_gcloud_config_when_absent(repo):
    [cmd] = dry_run(repo, "delete")
    assert not any(w.startswith("--project") for w in cmd)


def test_setup_ships_head_to_every_worker_and_installs_tpu_extra(repo):
    archive, scp, ssh = dry_run(repo, "setup", "--python", "3.11")
    assert archive[:4] == ["git", "-C", str(repo), "archive"] and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, "my-tpu:grpo_jax.tar.gz"] and "--worker=all" in scp
    assert flag(scp, "zone") == "us-central2-b"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    remote = flag(ssh, "command")
    assert "tar -xzf ~/grpo_jax.tar.gz -C ~/grpo_jax" in remote
    assert "uv venv --seed --python 3.11 .venv" in remote
    assert remote.endswith('.venv/bin/python -m pip install -e ".[tpu]"')
    subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_run_starts_trainer_on_every_worker_with_overrides_and_gcs_run_dir(repo):
    [cmd] = dry_run(repo, "run", "experiments/arith/", "loss.beta=0.04", "rollout.group_size=8",
                    "--run-dir", "gs://my-bucket/runs/arith-b04")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in cmd
    assert flag(cmd, "zone") == "us-central2-b"
    remote = flag(cmd, "command")
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    assert ("nohup setsid .venv/bin/grpo-jax train experiments/arith loss.beta=0.04 rollout.group_size=8 "
            "--run-dir gs://my-bucket/runs/arith-b04 > ~/grpo_jax_logs/arith-b04.log 2>&1 < /dev/null &") in remote


def test_run_dir_defaults_to_runs_experiment(repo):
    [cmd] = dry_run(repo, "run", "arith")
    assert "grpo-jax train experiments/arith --run-dir runs/arith > ~/grpo_jax_logs/arith.log" in flag(cmd, "command")


def test_run_remote_script_starts_trainer_in_background_with_exact_argv(repo):
    """Execute the printed remote script locally (HOME=tmp) against a fake grpo-jax that records its argv:
    awkward overrides survive both quoting levels, and the log, pid file and latest.log link are written."""
    weird = """data.prompt=it's a "quoted" $HOME `x`"""
    [cmd] = dry_run(repo, "run", "arith", weird, "--run-dir", "gs://b/r 1")
    fake = repo / "grpo_jax" / ".venv" / "bin" / "grpo-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$PWD" "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", "-c", flag(cmd, "command")], env={"HOME": str(repo), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True, timeout=30).stdout
    logs = repo / "grpo_jax_logs"
    assert (logs / "latest.log").resolve() == (logs / "r 1.log").resolve()
    assert int((logs / "r 1.pid").read_text()) > 0 and out.startswith("started on ")
    for _ in range(100):
        if (logs / "r 1.log").read_text():
            break
        time.sleep(0.05)
    argv = (logs / "r 1.log").read_text().splitlines()
    assert argv == [str(repo / "grpo_jax"), "train", "experiments/arith", weird, "--run-dir", "gs://b/r 1"]


def test_ssh_and_logs_pick_a_worker(repo):
    [shell] = dry_run(repo, "ssh")
    assert shell[4:] == ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=0"]
    [remote] = dry_run(repo, "ssh", "--worker=all", "--", "cat", "~/grpo_jax_logs/a.pid")
    assert flag(remote, "worker") == "all" and flag(remote, "command") == "cat ~/grpo_jax_logs/a.pid"
    [latest] = dry_run(repo, "logs")
    assert flag(latest, "worker") == "0" and flag(latest, "command") == "tail -n 200 -F ~/grpo_jax_logs/latest.log"
    [named] = dry_run(repo, "logs", "arith-b04", "--worker", "3")
    assert flag(named, "worker") == "3" and flag(named, "command") == "tail -n 200 -F ~/grpo_jax_logs/arith-b04.log"


def test_delete_is_quiet_and_asks_nothing_in_dry_run(repo):
    [cmd] = dry_run(repo, "delete")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-central2-b", "--quiet"]


@pytest.mark.parametrize("args, env, message", [
    (["create"], {"TPU_ZONE": "z"}, "missing --name: pass --name or set TPU_NAME"),
    (["ssh"], {"TPU_NAME": "t"}, "missing --zone: pass --zone or set TPU_ZONE"),
    (["create", "--version", "v"], ENV, "missing --accelerator-type: pass --accelerator-type or set TPU_TYPE"),
    (["create", "--accelerator-type", "v9x-8"], ENV,
     "no default --version for accelerator type 'v9x-8': pass --version"),
    (["create", "--spot", "--preemptible"], ENV, "pass only one of --spot and --preemptible"),
    (["run"], ENV, "missing experiment"),
    (["run", "nope"], ENV, "no experiments/nope/config.yaml"),
    (["setup", "a=1"], ENV, "key=value overrides only apply to 'run'"),
    (["run", "arith", "--worker", "1"], ENV, "--worker only applies to 'ssh' and 'logs'"),
    (["logs", "--worker", "x"], ENV, "--worker must be a worker index"),
    (["ssh", "--frob"], ENV, "unknown flag '--frob'"),
    (["ssh", "--zone"], ENV, "--zone needs a value"),
    (["launch"], ENV, "unknown command 'launch' (expected create|setup|run|ssh|logs|delete)"),
])
def test_bad_arguments_exit_2_with_one_line_error(repo, args, env, message):
    proc = launch(repo, *args, "--dry-run", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("launch/tpu_vm.sh: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_and_no_arguments(repo):
    proc = launch(repo, "--help")
    assert proc.returncode == 0 and "create" in proc.stdout and "TPU_ZONE" in proc.stdout
    proc = launch(repo)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")


def test_without_dry_run_a_missing_gcloud_is_a_clear_error(repo, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "dirname", "basename"):
        (tools / tool).symlink_to(shutil.which(tool))
    proc = launch(repo, "delete", "--yes", path=str(tools))
    assert proc.returncode == 2 and "gcloud not found: install the Google Cloud CLI" in proc.stderr
