"""The LoRA policy's sampler: applying the adapters in every decode step vs merging them into the weights first.

    python benchmarks/lora_sampler.py           # ~5M-param Qwen2 (E 256, 6 layers), rank 16 on all 7 projections,
                                                # 8 prompts x G 8 x 64 new tokens, 5 alternating rounds
    python benchmarks/lora_sampler.py --tiny    # seconds

``applied``: ``generate`` on the LoRA model itself (``transformer._dense`` adds (α/r)·(x·A)·B to every target
projection, each decode step). ``merged``: W + (α/r)·A·B folded once per batch (``models.lora.merged_state``, timed
with the sampling, as the loop would pay it after every update) and ``generate`` on the base model's graphdef.
Both sample the same tokens up to float rounding. Prints min and median seconds per batch of each, their ratio, and
a JSON line; the loop samples with whichever is faster (``grpo_jax/models/lora.py`` records the choice).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from grpo_jax.models import ModelConfig, build_model, lora
from grpo_jax.models.config import LoRAConfig
from grpo_jax.rollout import generate

SIZES = {"default": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
                         num_kv_heads=2, head_dim=64),
         "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)}
WORKLOADS = {"default": (8, 8, 64, 16, 5), "tiny": (2, 2, 8, 8, 2)}  # prompts, G, new tokens, prompt length, rounds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "default"
    prompts, G, new, prompt_len, rounds = WORKLOADS[size]
    base_cfg = ModelConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, **SIZES[size])
    base = build_model(base_cfg, rngs=nnx.Rngs(0))
    policy = lora.attach(base, LoRAConfig(rank=16, alpha=32.0), 1, None)
    graphdef, params = nnx.split(policy)
    flat = dict(nnx.to_flat_state(params))  # a trained adapter: B != 0
    for i, (path, var) in enumerate(sorted(flat.items())):
        if path[-1].endswith("_lora_b"):
            flat[path] = var.replace(0.02 * jax.random.normal(jax.random.key(i), var.shape))
    params = nnx.from_flat_state(flat)
    base_graphdef = nnx.split(base)[0]
    merge = jax.jit(lambda p: lora.merged_state(p, policy.config))
    tokens = np.random.default_rng(0).integers(3, base_cfg.vocab_size, (prompts, prompt_len)).tolist()

    def run(mode: str) -> float:
        start = time.perf_counter()
        model = (nnx.merge(graphdef, params) if mode == "applied"
                 else nnx.merge(base_graphdef, merge(params)))
        out = generate(model, tokens, max_new_tokens=new, num_samples=G, pad_id=0, rng=0, min_prompt_bucket=8)
        jax.block_until_ready(out.completion_BxT)
        return time.perf_counter() - start

    modes = ("applied", "merged")
    for mode in modes:  # compile
        run(mode)
    times = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            times[mode].append(run(mode))
    report = {m: {"min": min(t), "median": statistics.median(t)} for m, t in times.items()}
    report["merged_over_applied"] = report["applied"]["median"] / report["merged"]["median"]
    for m in modes:
        print(f"{m:8s}: {report[m]['median'] * 1e3:8.1f} ms per batch (median; min {report[m]['min'] * 1e3:.1f})")
    print(f"speed of merged / applied (median): {report['merged_over_applied']:.2f}x")
    print(json.dumps({"device": str(jax.devices()[0].platform), "workload": [prompts, G, new, prompt_len]} | report))
    return report


if __name__ == "__main__":
    main()
