import jax

from grpo_jax import cli


def test_eight_host_devices():
    assert jax.device_count() == 8


def test_cli_presets_prints_resolved_config(capsys):
    assert cli.main(["presets", "dapo"]) == 0
    out = capsys.readouterr().out
    assert "arXiv:2503.14476" in out and "clip_high: 0.28" in out and "agg: token-mean" in out
