"""Train-step throughput, MFU and peak memory of the jitted GRPO update; decode bandwidth utilisation.

    python benchmarks/train_step.py                      # Qwen2.5-0.5B-sized random model (accelerator)
    python benchmarks/train_step.py --size tiny          # CPU smoke run

Train step: tokens/s over (B x S) tokens per update, MFU = model FLOPs/s (grpo_jax.perf: 3 x forward, causal
attention) / device peak, peak memory from XLA's compiled memory analysis. Decode: one KV-cache decode step of the
rollout engine at batch B; bandwidth utilisation = (weights + KV bytes read per step) / step time / peak HBM BW.
Peaks are known for GPUs/TPUs only (null on CPU). Prints a human summary and one JSON line with the device.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import perf
from grpo_jax.algorithms import make_algorithm
from grpo_jax.losses import LossConfig
from grpo_jax.models import KVCache, ModelConfig, build_model
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step

SIZES = {
    # Qwen2.5-0.5B geometry (494M params with the 151936 vocab)
    "qwen05b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True,
                           tie_word_embeddings=True, dtype="bfloat16", param_dtype="float32", remat=True),
    "tiny": ModelConfig(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True),
}


def train_batch(cfg: ModelConfig, B: int, S: int, prompt: int) -> Batch:
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
    loss_mask = jnp.broadcast_to(jnp.arange(S) >= prompt, (B, S))
    return Batch(tokens_BxS=tokens, attn_mask_BxS=jnp.ones((B, S), bool), loss_mask_BxS=loss_mask,
                 old_logp_BxS=jnp.full((B, S), -2.0), ref_logp_BxS=jnp.full((B, S), -2.0),
                 adv=jnp.asarray(rng.normal(size=B), jnp.float32))


def bench_train(cfg: ModelConfig, B: int, S: int, micro: int, runs: int) -> dict:
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(OptimConfig(lr=1e-6), 100)
    state = init_train_state(params, opt)
    step = make_train_step(graphdef, opt, StepConfig(micro_batches=micro), make_algorithm(loss=LossConfig(beta=0.04)),
                           state_sharding=jax.tree.map(lambda x: x.sharding, state))
    batch = train_batch(cfg, B, S, S // 4)
    memory = step.lower(state, batch).compile().memory_analysis()
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        return metrics

    times = perf.time_runs(run, runs, warmup=2)  # the first two calls include one-time costs
    tokens = B * S
    flops = perf.train_flops_per_token(cfg, S) * tokens
    peak_flops, _ = perf.device_peaks()
    tok_s = perf.rates(times, tokens)
    return {
        "batch": B, "seq_len": S, "micro_batches": micro, "tokens_per_s": tok_s,
        "model_tflops_per_s": flops / min(times) / 1e12,
        "mfu": flops / min(times) / peak_flops if peak_flops else None,
        "peak_memory_bytes": getattr(memory, "temp_size_in_bytes", 0) + getattr(memory, "argument_size_in_bytes", 0)
        + getattr(memory, "output_size_in_bytes", 0) - getattr(memory, "alias_size_in_bytes", 0) if memory else None,
    }


def bench_decode(cfg: ModelConfig, B: int, context: int, runs: int) -> dict:
    model = build_model(dataclasses.replace(cfg, remat=False), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = KVCache.init(cfg, B, context + 1)
    cache = dataclasses.replace(cache, mask_BxS=cache.mask_BxS.at[:, :context].set(True), index=jnp.int32(context))

    @jax.jit
    def decode(state, cache, tokens):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return logits, cache

    tokens = jnp.zeros((B, 1), jnp.int32)
    times = perf.time_runs(lambda: decode(state, cache, tokens), runs)
    bytes_per_param = jnp.dtype(cfg.compute_dtype).itemsize
    moved = perf.decode_bytes_per_step(cfg, B, context, bytes_per_param)
    _, peak_bw = perf.device_peaks()
    return {
        "batch": B, "context": context, "step_ms": {"best": 1e3 * min(times), "median": 1e3 * float(np.median(times))},
        "tokens_per_s": perf.rates(times, B), "bytes_per_step": moved,
        "hbm_utilisation": moved / min(times) / peak_bw if peak_bw else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="qwen05b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    if args.size == "tiny":
        args.batch, args.seq_len, args.micro_batches, args.decode_batch, args.context, args.runs = 8, 32, 2, 8, 32, 2
    cfg = SIZES[args.size]
    result = {
        "benchmark": "train_step", **perf.device_info(), "size": args.size, "params_matmul": perf.matmul_params(cfg),
        "train": bench_train(cfg, args.batch, args.seq_len, args.micro_batches, args.runs),
        "decode": bench_decode(cfg, args.decode_batch, args.context, args.runs),
    }
    t, d = result["train"], result["decode"]
    print(f"{result['device_kind']}: train {t['tokens_per_s']['median']:.0f} tok/s (median), "
          f"{t['model_tflops_per_s']:.2f} model TFLOP/s, MFU {t['mfu'] if t['mfu'] is None else round(t['mfu'], 3)}, "
          f"peak memory {t['peak_memory_bytes'] / 2**30 if t['peak_memory_bytes'] else float('nan'):.2f} GiB; "
          f"decode {d['step_ms']['median']:.2f} ms/step at batch {d['batch']}, HBM utilisation {d['hbm_utilisation']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
