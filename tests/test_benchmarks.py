"""Benchmarks run at tiny size (figures printed, never asserted), and the FLOP/byte accounting they rely on."""
import importlib.util
import json
from pathlib import Path

import pytest

from grpo_jax import perf
from grpo_jax.models import ModelConfig

BENCH = Path(__file__).parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_and_byte_accounting_hand_computed():
    cfg = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4)
    # per layer: q 8*2*4=64, k+v 2*8*1*4=64, o 2*4*8=64, MLP 3*8*16=384 -> 576; x2 layers + head 8*100 = 1952
    assert perf.matmul_params(cfg) == 2 * 576 + 800
    # forward/token at context 10: 2*1952 + 4 * layers 2 * heads 2 * head_dim 4 * 10 = 3904 + 640
    assert perf.forward_flops_per_token(cfg, 10) == 3904 + 640
    assert perf.train_flops_per_token(cfg, 20) == 3 * (3904 + 640)  # causal: mean context 20/2
    # decode bytes (bf16): weights 1952*2 + K and V: 2 * layers 2 * batch 3 * context 5 * kv 1 * head_dim 4 * 2
    assert perf.decode_bytes_per_step(cfg, 3, 5) == 1952 * 2 + 2 * 2 * 3 * 5 * 4 * 2
    assert perf.device_peaks()[0] is None  # CPU: no published peak, so MFU is reported as null


def test_step_throughput_hand_computed():
    """Per-phase model FLOP/s of one RL step (the figures loop.py logs every step); no MFU on CPU."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4)
    # forward per token at context c: 3904 + 64 c. Rollout: 2 rows x 2 prompt tokens at c = 1, then 1 and 3 new
    # tokens at c = 2 + 1/2 and 2 + 3/2.
    rollout = 2 * 2 * (3904 + 64) + 1 * (3904 + 64 * 2.5) + 3 * (3904 + 64 * 3.5)
    out = perf.step_throughput(cfg, {"rollout_s": 1.0, "prep_s": 2.0, "train_s": 4.0}, prompt_len=2,
                               new_tokens_B=[1, 3], seq_tokens=10, seq_len=5, updates=2, reference=True)
    assert out["throughput/rollout_tflops"] == pytest.approx(rollout / 1e12)
    assert out["throughput/prep_tflops"] == pytest.approx(10 * (3904 + 64 * 2.5) / 2 / 1e12)  # the reference forward
    assert out["throughput/update_tflops"] == pytest.approx(2 * 3 * 10 * (3904 + 64 * 2.5) / 4 / 1e12)
    assert not any(k.startswith("mfu/") for k in out)  # CPU: no known peak
    no_ref = perf.step_throughput(cfg, {"rollout_s": 1.0, "prep_s": 2.0, "train_s": 4.0}, prompt_len=2,
                                  new_tokens_B=[1, 3], seq_tokens=10, seq_len=5, updates=1, reference=False)
    assert "throughput/prep_tflops" not in no_ref


def test_forward_benchmark_smoke(capsys):
    report = load("forward").main(["--tiny"])
    assert report["max_abs_logits_diff"] < 1e-4
    assert report["ours"]["median"] > 0 and report["theirs"]["median"] > 0
    assert "ratio ours/theirs" in capsys.readouterr().out


@pytest.mark.slow
def test_rollout_benchmark_smoke(capsys):
    result = load("rollout").main(["--tiny"])
    assert result["ours"]["median"] > 0 and result["theirs"]["median"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "rollout"


def test_train_step_benchmark_smoke(capsys):
    result = load("train_step").main(["--size", "tiny"])
    assert result["train"]["tokens_per_s"]["median"] > 0 and result["train"]["peak_memory_bytes"] > 0
    assert result["train"]["mfu"] is None and result["decode"]["hbm_utilisation"] is None  # CPU
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["device_kind"] == "cpu"


@pytest.mark.slow
def test_step_vs_trl_benchmark_smoke(capsys):
    """Both sides (TRL GRPOTrainer and our loop, data parallel over 2 host devices) each run a step in their own
    process."""
    (result,) = load("step_vs_trl").main(["--tiny", "--devices", "2"])
    assert result["devices"] == 2
    assert result["trl"]["step_s"]["median"] > 0 and result["grpo_jax"]["step_s"]["median"] > 0
    assert result["grpo_jax"]["update_s"]["median"] > 0 and result["update_over_ref_forward"] > 0
    assert result["recompiles_after_warmup"] == [0]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "step_vs_trl"


def test_update_layouts_benchmark_smoke(capsys):
    result = load("update_layouts").main(["--tiny"])
    losses = {k: v["first_loss"] for k, v in result["layouts"].items()}
    assert set(losses) == {"padded", "packed", "shared_prompt"} and all(v["update"] > 0 for v in
                                                                       result["layouts"].values())
    assert max(losses.values()) - min(losses.values()) < 1e-4  # the same update in every layout
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "update_layouts"


@pytest.mark.slow
def test_async_rollout_benchmark_smoke(capsys):
    """sync and one_step_off each train a tiny arith_tiny in their own process, with the judge's sleep in ``score``."""
    result = load("async_rollout").main(["--tiny"])
    sync, off = result["modes"]["sync"], result["modes"]["one_step_off"]
    assert sync["steps_per_s"] > 0 and off["steps_per_s"] > 0 and sync["steps"] == off["steps"] == 3
    assert sync["staleness_mean"] == 0 and off["staleness_mean"] == 1  # measured steps come after step 0
    # the patched score sleeps 0.05 s in the main thread (sync) and in the rollout thread (one_step_off)
    assert sync["phases_median_s"]["reward_s"] >= 0.05 and off["phases_median_s"]["reward_s"] >= 0.05
    assert sync["phases_median_s"]["rollout_wait_s"] == 0 and off["phases_median_s"]["weight_sync_s"] > 0
    assert sync["recompiles_after_warmup"] == off["recompiles_after_warmup"] == [0]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "async_rollout"


@pytest.mark.slow
def test_smoke_real_benchmark_smoke(capsys):
    """The full-size smoke run's script at a tiny geometry, LoRA only (one ``grpo-jax train`` process)."""
    (result,) = load("smoke_real").main(["--geometry", "tiny", "--modes", "lora"])
    assert result["second_step_s"] > 0 and result["compiled_peak_gib"] > 0
    assert result["reference_params_gib"] == 0.0  # LoRA: the base weights are the reference
    assert "MiB/device compiled vs" in capsys.readouterr().out


def test_lora_sampler_benchmark_smoke(capsys):
    report = load("lora_sampler").main(["--tiny"])
    assert report["applied"]["median"] > 0 and report["merged"]["median"] > 0
    assert "speed of merged / applied" in capsys.readouterr().out
