"""Benchmarks run at tiny size (figures printed, never asserted)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_rollout_benchmark_smoke(capsys):
    result = load("rollout").main(["--tiny"])
    assert result["grpo_jax_tok_s"]["median"] > 0 and result["transformers_tok_s"]["median"] > 0
    assert '"benchmark": "rollout"' in capsys.readouterr().out
