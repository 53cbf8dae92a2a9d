"""Full-size smoke run: two GRPO steps at a real model's geometry, full fine-tuning and LoRA, on an 8-device mesh.

    python benchmarks/smoke_real.py                      # Qwen2.5-0.5B and Qwen3-0.6B geometry, full + LoRA (~30 min)
    python benchmarks/smoke_real.py --geometry qwen3_06b --modes lora
    python benchmarks/smoke_real.py --geometry tiny      # seconds: the suite's check that this script works

Each run is ``grpo-jax train`` in its own process on a random-init model with the published config of
``Qwen/Qwen2.5-0.5B-Instruct`` or ``Qwen/Qwen3-0.6B`` (``grpo_jax.models.published``: 151,936-token vocabulary,
24 / 28 layers), a byte-level BPE tokenizer trained here with ``tokenizers`` on generated arithmetic text and given
a Qwen-style chat template, the arith task rendered through that template, and the research configs' settings:
``mesh.fsdp=8`` over 8 host devices (``--xla_force_host_platform_device_count``), remat, bfloat16 compute on float32
params, GRPO with β = 0.04 (a reference pass: a copy of the policy for full fine-tuning, the base weights with the
adapter off for LoRA), 2 prompts x G 4, 16 new tokens. LoRA: rank 16, alpha 32, all seven projections.
The sampler runs on its own mesh over the same 8 devices, tensor = 8, in bfloat16 (``rollout.mesh``,
``rollout.dtype``: a tensor-parallel sampler beside an FSDP trainer, as verl and tunix run one): under fsdp = 8 XLA
hoists every layer's all-gather out of the decode loop, and XLA:CPU keeps float32 copies of bfloat16 weights, so
each of the 8 host devices held the whole model in float32, more than this machine's 24 GB with the trainer's
state. glibc's malloc serves XLA's large buffers from mmap (``MALLOC_MMAP_THRESHOLD_`` = 1 MiB), so those freed go
back to the system between phases (without it the second step's rollout went past 23 GiB and was killed).

Per run it prints the first step's wall time (it compiles the sampler, the reference pass and the update), the
second step's (compiled), the compiled train step's peak bytes per device (XLA's memory analysis,
``train.log_memory``) against ``grpo_jax.memory``'s estimate of the same (params + optimizer state + the train
phase, with ``xla_cpu=True``: the float32 copies XLA:CPU keeps of bfloat16 arrays it computes with), and the LoRA /
full ratio of that peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from grpo_jax.start import with_cpu_devices

ROOT = Path(__file__).parents[1]
GEOMETRIES = {"qwen25_05b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen3_06b": "Qwen/Qwen3-0.6B", "tiny": None}
LORA = {"rank": 16, "alpha": 32.0}
CHAT_TEMPLATE = (  # Qwen's ChatML turns (without its default system prompt and tool calls)
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def train_tokenizer(folder: Path, vocab_size: int = 1024) -> None:
    """A byte-level BPE tokenizer (Qwen's kind) trained on generated arithmetic lines, with ChatML specials."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    text = [f"{a} + {b} = {a + b}. The answer is {a + b}." for a, b in
            ((rng.randrange(1000), rng.randrange(1000)) for _ in range(5000))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def model_init(geometry: str) -> dict:
    from grpo_jax.config import to_dict
    from grpo_jax.models import ModelConfig
    from grpo_jax.models.published import PUBLISHED_CONFIGS

    if geometry == "tiny":
        cfg = ModelConfig(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True)
    else:
        cfg = ModelConfig.from_hf_config(PUBLISHED_CONFIGS[GEOMETRIES[geometry]])
    return to_dict(dataclasses.replace(cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None))


def experiment(geometry: str, tokenizer: Path, lora: bool, steps: int) -> dict:
    model = {"init": model_init(geometry), "tokenizer": str(tokenizer), "dtype": "bfloat16",
             "param_dtype": "float32", "remat": True} | ({"lora": LORA} if lora else {})
    return {"seed": 0, "model": model,
            "data": {"task": "arith", "difficulty": 2, "num_examples": 200, "held_out_fraction": 0.1},
            "rewards": {"fns": [{"name": "exact_int"}], "num_workers": 1},
            "algo": {"preset": "grpo", "loss": {"beta": 0.04}},
            "rollout": {"group_size": 4, "max_new_tokens": 16, "min_prompt_bucket": 32, "dtype": "bfloat16",
                        "mesh": {"data": 1, "fsdp": 1, "tensor": 8}},
            "train": {"steps": steps, "batch_prompts": 2, "log_memory": True,
                      "layout": "padded"},  # the rows grpo_jax.memory's estimate counts
            "optim": {"lr": 1e-5 if lora else 1e-6}, "eval": {"num_examples": 0},
            "checkpoint": {"every": 1000, "async_save": False, "export_hf": False},
            "mesh": {"data": 1, "fsdp": 8, "tensor": 1}}


def estimated_train_peak(exp_dir: Path) -> int:
    """grpo_jax.memory's bytes per device of what the compiled train step holds: params, optimizer state and the
    train phase (gradients, activations), at the longest training prompt."""
    from grpo_jax.data import build_splits
    from grpo_jax.evaluation import encode_prompts
    from grpo_jax.experiment import load_experiment
    from grpo_jax.memory import estimate_experiment
    from grpo_jax.run_setup import load_tokenizer

    cfg = load_experiment(str(exp_dir))
    tokenizer = load_tokenizer(cfg.model)
    prompt_len = max(map(len, encode_prompts(tokenizer, build_splits(cfg.data, tokenizer).train)))
    est = estimate_experiment(cfg, cfg.model.init, 8, prompt_len=prompt_len, xla_cpu=True)
    return est.params + est.optimizer + est.phases["train"]


def run_one(workdir: Path, geometry: str, mode: str, tokenizer: Path, steps: int) -> dict:
    exp_dir = workdir / f"{geometry}_{mode}"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "config.yaml").write_text(yaml.safe_dump(experiment(geometry, tokenizer, mode == "lora", steps)))
    env = with_cpu_devices(os.environ, 8) | {
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.cli", "train", str(exp_dir), "--run-dir",
                           str(exp_dir / "run"), "--no-progress"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{geometry} {mode}: grpo-jax train failed (exit {proc.returncode}; a negative one is the "
                           f"signal, -9 often the kernel's OOM killer):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (exp_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "time/step_s" in r]
    peak = steps_[0]["memory/train_step/peak_bytes"]
    estimate = estimated_train_peak(exp_dir)
    return {"geometry": geometry, "mode": mode, "process_s": wall, "first_step_s": steps_[0]["time/step_s"],
            "second_step_s": steps_[-1]["time/step_s"], "compiled_peak_gib": peak / 2**30,
            "estimate_gib": estimate / 2**30, "estimate_error": estimate / peak - 1,
            "reference_params_gib": steps_[0]["memory/reference_params_bytes"] / 2**30}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", nargs="+", choices=sorted(GEOMETRIES), default=["qwen25_05b", "qwen3_06b"])
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="smoke_real_") as tmp:
        workdir = Path(tmp)
        train_tokenizer(workdir / "tokenizer")
        for geometry in args.geometry:
            for mode in args.modes:
                r = run_one(workdir, geometry, mode, workdir / "tokenizer", args.steps)
                results.append(r)
                print(f"{geometry:11s} {mode:4s}: first step {r['first_step_s']:7.1f} s (compiles), second "
                      f"{r['second_step_s']:6.1f} s; train step peak {r['compiled_peak_gib'] * 1024:.1f} MiB/device "
                      f"compiled vs {r['estimate_gib'] * 1024:.1f} estimated ({r['estimate_error']:+.0%}); "
                      f"reference copy {r['reference_params_gib'] * 1024:.1f} MiB", flush=True)
    for geometry in args.geometry:
        peaks = {r["mode"]: r["compiled_peak_gib"] for r in results if r["geometry"] == geometry}
        if len(peaks) == 2:
            print(f"{geometry}: LoRA / full compiled train-step peak = {peaks['lora'] / peaks['full']:.2f}")
    print(json.dumps({"device": "cpu x8 (host devices)", "results": results}))
    return results


if __name__ == "__main__":
    main()
