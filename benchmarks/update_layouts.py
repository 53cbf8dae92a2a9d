"""The GRPO update in each ``train.layout``: padded rows against packed rows and a shared prompt per group.

    python benchmarks/update_layouts.py            # standard model, 8 prompts x G 8, 128-token prompts : 32 new
    python benchmarks/update_layouts.py --tiny     # seconds-long smoke run (tests/test_benchmarks.py)

The model is the standard workload's (``shared/perf/workload.md``: a random Qwen2, vocab 512, E 128, F 384, 4 layers,
4 heads, 2 KV heads, tied embeddings, float32, layers unrolled). The batch is a rollout of ``--prompts`` x ``--group``
rows with prompts left-padded to ``--prompt-len`` and completions right-padded to ``--new-tokens`` (4:1); each
group's prompt has a uniform length in [P/2, P] and each completion one in [C/2, C] (mean real lengths 4:1 too). The
update is one jitted GRPO step (token-mean loss, clip 0.2, β 0.04 with reference log-probs, AdamW); the reference
pass is ``run_setup.logprob_fn`` of the same layout. Layouts alternate within each round; the figures are medians
of ``--runs`` rounds after two warm-up calls. Host planning (``grpo_jax.layout``, numpy) is timed apart: a run pays
it once per batch for the step and once for the reference pass. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import perf
from grpo_jax.algorithms import make_algorithm
from grpo_jax.layout import Layout, with_plan
from grpo_jax.losses import LossConfig
from grpo_jax.models import ModelConfig, build_model
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.run_setup import logprob_fn
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step, state_sharding

MODEL = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True, tie_word_embeddings=True,
                    scan_layers=False)
TINY = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True)
LAYOUTS = ("padded", "packed", "shared_prompt")


def rollout_batch(cfg: ModelConfig, prompts: int, G: int, P: int, C: int, seed: int = 0) -> Batch:
    """Group-shared prompts left-padded to P (lengths uniform in [P/2, P]), completions right-padded to C (uniform
    in [C/2, C]); loss on the completion tokens."""
    rng = np.random.default_rng(seed)
    B = prompts * G
    p_len = np.repeat(rng.integers(P // 2, P + 1, prompts), G)
    c_len = rng.integers(C // 2, C + 1, B)
    pos = np.arange(P + C)[None]
    attn = (pos >= P - p_len[:, None]) & (pos < P + c_len[:, None])
    tokens = np.repeat(rng.integers(3, cfg.vocab_size, (prompts, P + C)), G, axis=0)
    tokens[:, P:] = rng.integers(3, cfg.vocab_size, (B, C))
    tokens = np.where(attn, tokens, 0).astype(np.int32)
    loss_mask = attn & (pos >= P)
    old = np.where(loss_mask, -2.0, 0.0).astype(np.float32)
    return Batch(tokens_BxS=jnp.asarray(tokens), attn_mask_BxS=jnp.asarray(attn), loss_mask_BxS=jnp.asarray(loss_mask),
                 old_logp_BxS=jnp.asarray(old), ref_logp_BxS=jnp.asarray(old),
                 adv=jnp.asarray(rng.normal(size=B), jnp.float32))


def setups(cfg: ModelConfig, batch: Batch, G: int, C: int, micro: int, chunk: int) -> dict:
    """Per layout: (the step, its state holder, its planned batch, the reference call, host planning seconds); the
    layouts know the completion's C columns (``rollout.max_new_tokens`` in a run) for the reference pass's plan."""
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(OptimConfig(lr=1e-5), 100)
    algorithm = make_algorithm(loss=LossConfig(beta=0.04, agg="token-mean"))
    out = {}
    for kind in LAYOUTS:
        state = init_train_state(params, opt)
        step = make_train_step(graphdef, opt, StepConfig(micro_batches=micro, logprob_chunk=chunk), algorithm,
                               state_sharding=state_sharding(state))
        layout = None if kind == "padded" else Layout(kind=kind, group_size=G, micro_batches=micro, new_tokens=C)
        t0 = time.perf_counter()
        planned = batch if layout is None else with_plan(batch, layout)
        plan_s = time.perf_counter() - t0
        reference = logprob_fn(graphdef, 1.0, chunk, micro, layout)
        out[kind] = dict(step=step, state=[state], batch=planned, plan_s=plan_s,
                         reference=lambda r=reference: r(params, batch.tokens_BxS, batch.attn_mask_BxS))
    return out


def measure(parts: dict, runs: int) -> dict:
    """Median ms of the update and of the reference pass per layout, calls alternating between layouts."""
    times = {k: {"update": [], "reference": []} for k in parts}
    for i in range(runs + 2):
        for kind, p in parts.items():
            t0 = time.perf_counter()
            p["state"][0], metrics = p["step"](p["state"][0], p["batch"])
            jax.block_until_ready(metrics)
            t1 = time.perf_counter()
            jax.block_until_ready(p["reference"]())
            t2 = time.perf_counter()
            if i >= 2:
                times[kind]["update"].append(t1 - t0)
                times[kind]["reference"].append(t2 - t1)
            if i == 0:  # every layout's first update starts from the same params: the same loss
                p["loss"] = float(metrics["loss"])
    return {k: {part: 1e3 * statistics.median(v) for part, v in t.items()} | {
        "plan_ms": 1e3 * parts[k]["plan_s"], "first_loss": parts[k]["loss"]} for k, t in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = MODEL
    if args.tiny:
        cfg, args.prompts, args.group, args.prompt_len, args.new_tokens, args.runs = TINY, 2, 4, 16, 4, 2
    batch = rollout_batch(cfg, args.prompts, args.group, args.prompt_len, args.new_tokens)
    result = measure(setups(cfg, batch, args.group, args.new_tokens, args.micro_batches, 128), args.runs)
    pad = result["padded"]
    for kind, r in result.items():
        r["speedup_update"] = pad["update"] / r["update"]
        r["speedup_update_and_reference"] = (pad["update"] + pad["reference"]) / (r["update"] + r["reference"])
        print(f"{kind:>14}: update {r['update']:8.1f} ms ({r['speedup_update']:.2f}x), reference "
              f"{r['reference']:7.1f} ms, both {r['speedup_update_and_reference']:.2f}x, host plan "
              f"{r['plan_ms']:.1f} ms")
    real = float(np.asarray(batch.attn_mask_BxS).mean())
    out = {"benchmark": "update_layouts", **perf.device_info(), "rows": args.prompts * args.group,
           "group": args.group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "micro_batches": args.micro_batches, "real_token_fraction": real, "runs": args.runs, "layouts": result}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
