import jax

from grpo_jax import cli


def test_eight_host_devices():
    assert jax.device_count() == 8


def test_cli_presets_prints_resolved_config(capsys):
    assert cli.main(["presets", "dapo"]) == 0
    out = capsys.readouterr().out
    assert "arXiv:2503.14476" in out and "clip_high: 0.28" in out and "agg: token-mean" in out


def test_grpo_jax_command_runs_with_huge_pages(tmp_path):
    """``grpo-jax`` re-executes itself once with glibc's hugetlb tunable (grpo_jax.start), keeping other tunables
    and an explicit choice; a sitecustomize records the environment each process starts with."""
    import os
    import subprocess
    import sys

    from grpo_jax.start import HUGE_PAGES, with_huge_pages

    assert with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": HUGE_PAGES}
    tunables = with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert tunables == f"glibc.malloc.arena_max=2:{HUGE_PAGES}"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"with open({str(tmp_path / 'seen')!r}, 'a') as f:\n"
        "    f.write(f\"{sys.argv[0].rsplit('/', 1)[-1]} {os.environ.get('GLIBC_TUNABLES')}\\n\")\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['grpo-jax', 'presets', 'dapo']; "
                          "from grpo_jax.start import entry; entry()"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "arXiv:2503.14476" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "seen").read_text().split("\n")[:2] == ["-c None", f"-m {HUGE_PAGES}"]


def test_child_cpu_devices_keep_the_other_xla_flags():
    from grpo_jax.start import with_cpu_devices

    env = with_cpu_devices({"A": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/d"}, 2)
    assert env == {"A": "1", "XLA_FLAGS": "--xla_dump_to=/d --xla_force_host_platform_device_count=2"}
    assert with_cpu_devices({}, 4) == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
