"""Tiny experiment configs and subprocess runs for the trainer tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from grpo_jax.start import with_cpu_devices

ROOT = Path(__file__).parents[1]

TINY_MODEL = dict(model_type="qwen2", vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True)


def tiny_experiment(**sections) -> dict:
    """A seconds-per-step arithmetic experiment; keyword sections replace/extend the defaults."""
    cfg = {
        "seed": 0,
        "model": {"tokenizer": "char", "init": dict(TINY_MODEL)},
        "data": {"task": "arith", "difficulty": 1, "num_examples": 400, "held_out_fraction": 0.05},
        "rewards": {"fns": [{"name": "exact_int"}], "num_workers": 1},
        "algo": {"preset": "grpo", "loss": {"beta": 0.04}},
        "rollout": {"group_size": 4, "max_new_tokens": 6, "min_prompt_bucket": 8},
        "train": {"steps": 6, "batch_prompts": 4},
        "optim": {"lr": 1e-3},
        "eval": {"num_examples": 8, "batch_prompts": 8},
        "checkpoint": {"every": 2, "async_save": False, "export_hf": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def write_experiment(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def cli_env(cache_dir: Path, devices: int = 1) -> dict:
    """A `grpo-jax` subprocess's environment: ``devices`` CPU devices (one by default), the suite's other XLA flags
    (tests/conftest.py), the compilation cache at ``cache_dir``."""
    return with_cpu_devices(os.environ, devices) | dict(GRPO_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu",
                                                        PYTHONPATH=str(ROOT))


def train_cmd(experiment: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "grpo_jax.cli", "train", str(experiment), "--run-dir", str(run_dir),
            "--no-progress", *overrides]


def run_train(experiment: Path, run_dir: Path, cache_dir: Path, *overrides: str, timeout=600, devices: int = 1):
    return subprocess.run(train_cmd(experiment, run_dir, *overrides), env=cli_env(cache_dir, devices),
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def length_reward(prompt: str, completion: str, example: dict) -> float:
    """A reward that always varies inside a group (for tests that need non-zero advantages)."""
    return float(len(completion))


def odd_signal_reward(prompt: str, completion: str, example: dict) -> float:
    """Zero variance for every question whose answer is even (reward 0); otherwise a hash of the completion, which
    differs between distinct samples (for the dynamic-sampling tests)."""
    import zlib

    return 0.0 if int(example["answer"]) % 2 == 0 else (zlib.crc32(completion.encode()) % 1000) / 1000


def zero_reward(prompt: str, completion: str, example: dict) -> float:
    return 0.0
