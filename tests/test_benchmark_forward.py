"""benchmarks/forward.py runs at tiny size and both sides compute the same logits (speed printed, never asserted)."""
import importlib.util
from pathlib import Path


def test_forward_benchmark_smoke(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "forward.py"
    spec = importlib.util.spec_from_file_location("bench_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--tiny"])
    assert report["max_abs_logits_diff"] < 1e-4
    assert report["ours"]["tokens_per_s_median"] > 0 and report["torch"]["tokens_per_s_median"] > 0
    assert "ratio ours/torch" in capsys.readouterr().out
