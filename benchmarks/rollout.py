"""Rollout throughput: grpo_jax.rollout.generate vs transformers (torch) generate with KV cache, same workload.

    python benchmarks/rollout.py                   # 8 prompts x 8 samples = 64 sequences x 64 new tokens, ~5M params
    python benchmarks/rollout.py --shape standard  # issue 15's standard workload: 8 x 8 x 32 new tokens, 6-token
                                                   # prompts, a 0.9M-param model (E 128, F 384, 4 layers, V 512)
    python benchmarks/rollout.py --tiny            # seconds-long smoke run (= --shape tiny)

Both sides sample (temperature 1) the same number of new tokens for every row (no early EOS). Compilation and
torch warm-up are timed separately and excluded from the throughput. Prints min and median tokens/s of each side,
their ratio (ours / transformers, measured in this same run) and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from grpo_jax import perf
from grpo_jax.models import load_hf
from grpo_jax.rollout import generate

SIZES = {  # default ~5.2M params: tied 2048x256 embedding + 6 layers of (attention 196k + SwiGLU 590k)
    "default": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2),
    "standard": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
WORKLOADS = {  # (prompts, samples, new tokens, prompt length, repeats); flags given explicitly override these
    "default": (8, 8, 64, 32, 3),
    "standard": (8, 8, 32, 6, 5),
    "tiny": (2, 2, 8, 8, 1),
}


def matmul_floor(model, batch: int, steps: int):
    """A jitted loop of ``steps`` decode steps that does only the dense matmuls of the model (q/k/v/o, MLP and the
    vocab projection on a [batch, E] activation): no attention, cache, norms or sampling. No sampler can run the
    same model faster than this on the same machine, so it bounds the reachable speed-up."""
    graphdef, state = nnx.split(model)
    x = jnp.ones((batch, model.config.hidden_size), model.config.compute_dtype)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        layers = m.model.split_layers()

        def step(_, x):
            for p in layers:
                qkv = (jnp.einsum("be,enh->bnh", x, p["q"][...]).sum(1)
                       + jnp.einsum("be,enh->bnh", x, p["k"][...]).sum(1)
                       + jnp.einsum("be,enh->bnh", x, p["v"][...]).sum(1))
                attn = jnp.broadcast_to(qkv[:, None], (batch,) + p["o"].shape[:2])
                x = x + jnp.einsum("bnh,nhe->be", attn, p["o"][...])
                x = x + (jax.nn.silu(x @ p["gate"][...]) * (x @ p["up"][...])) @ p["down"][...]
            return x + 1e-6 * (x @ m.lm_head_ExV())[:, : x.shape[1]]

        return jax.lax.fori_loop(0, steps, step, x)

    return lambda: run(state, x)


def transformers_worker(spec: dict) -> None:
    """Child process (``--worker SPEC_JSON``): transformers generate on the same weights, one timed run per "run"
    line on stdin, its seconds printed on stdout; "stop" ends it.

    A process of its own because torch's and XLA's CPU thread pools in one process slow each other down (we saw
    transformers 20x slower right after a JAX run in the same process)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["folder"]).eval()
    ids = torch.tensor(spec["prompts"])
    samples, new_tokens = spec["samples"], spec["new_tokens"]

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, num_return_sequences=samples, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
        assert out.shape == (ids.shape[0] * samples, ids.shape[1] + new_tokens)

    run()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        run()
        print(time.perf_counter() - start, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SIZES), default="default", help="model size and workload")
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny (smoke test)")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the transformers side, in its own process
    args = ap.parse_args(argv)
    if args.worker:
        return transformers_worker(json.loads(args.worker))
    shape = "tiny" if args.tiny else args.shape
    for name, value in zip(("prompts", "samples", "new_tokens", "prompt_len", "repeats"), WORKLOADS[shape]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    size = SIZES[shape]

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(**size, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                                      bos_token_id=1, max_position_embeddings=4096)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, size["vocab_size"], args.prompt_len)] for _ in range(args.prompts)]
    n_tokens = args.prompts * args.samples * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_hf(tmp)
        spec = {"folder": tmp, "prompts": prompts, "samples": args.samples, "new_tokens": args.new_tokens}
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            def ours(seed=0):
                out = generate(model, prompts, max_new_tokens=args.new_tokens, num_samples=args.samples,
                               temperature=1.0, eos_ids=(), pad_id=0, rng=seed)
                assert int(out.lengths_B.sum()) == n_tokens

            def theirs() -> float:
                worker.stdin.write("run\n")
                worker.stdin.flush()
                return float(worker.stdout.readline())

            t0 = time.perf_counter()
            ours()
            compile_s = time.perf_counter() - t0
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the transformers worker failed to start (exit code {worker.poll()})")
            ours_s, theirs_s = [], []
            for _ in range(args.repeats):  # interleaved, so a noisy stretch of the machine hits both sides
                ours_s += perf.time_runs(ours, 1, 0)
                theirs_s.append(theirs())
            worker.stdin.write("stop\n")
            worker.stdin.flush()
        finally:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    floor_s = perf.time_runs(matmul_floor(model, args.prompts * args.samples, args.new_tokens), args.repeats)
    print(f"{n_params / 1e6:.1f}M params, {args.prompts * args.samples} sequences x {args.new_tokens} new tokens; "
          f"ours = grpo_jax.generate (first call incl. compile {compile_s:.1f}s), theirs = transformers generate "
          f"(KV cache, in its own process)")
    result = {
        "benchmark": "rollout", "shape": shape, **perf.device_info(), "params": n_params,
        "sequences": args.prompts * args.samples, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
        "grpo_jax_first_call_s": compile_s,
        **perf.compare(ours_s, theirs_s, n_tokens),
        "matmul_floor": perf.rates(floor_s, n_tokens),
        "max_ratio_at_matmul_floor": float(np.median(theirs_s) / min(floor_s)),
    }
    print(f"matmul floor (the decode steps' dense matmuls alone, nothing else): "
          f"{n_tokens / min(floor_s):,.0f} tokens/s "
          f"-> at most {result['max_ratio_at_matmul_floor']:.2f}x transformers' median on this machine")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
