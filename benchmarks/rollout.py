"""Rollout throughput: grpo_jax.rollout.generate vs transformers (torch) generate with KV cache, same workload.

    python benchmarks/rollout.py            # 8 prompts x 8 samples = 64 sequences x 64 new tokens, ~5M params
    python benchmarks/rollout.py --tiny     # seconds-long smoke run

Both sides sample (temperature 1) the same number of new tokens for every row (no early EOS). Compilation and
torch warm-up are timed separately and excluded from the throughput. Prints min and median tokens/s of each side,
their ratio (ours / transformers, measured in this same run) and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from grpo_jax import perf
from grpo_jax.models import load_hf
from grpo_jax.rollout import generate

SIZES = {  # ~5.2M params: tied 2048x256 embedding + 6 layers of (attention 196k + SwiGLU 590k)
    "default": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (smoke test)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.tiny:
        args.prompts, args.samples, args.new_tokens, args.prompt_len, args.repeats = 2, 2, 8, 8, 1
    size = SIZES["tiny" if args.tiny else "default"]

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(**size, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                                      bos_token_id=1, max_position_embeddings=4096)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_hf(tmp)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, size["vocab_size"], args.prompt_len)) for _ in range(args.prompts)]
    n_tokens = args.prompts * args.samples * args.new_tokens

    def ours(seed=0):
        out = generate(model, prompts, max_new_tokens=args.new_tokens, num_samples=args.samples, temperature=1.0,
                       eos_ids=(), pad_id=0, rng=seed)
        assert int(out.lengths_B.sum()) == n_tokens

    ids = torch.tensor(prompts)

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                              top_k=0, num_return_sequences=args.samples, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=0, use_cache=True)
        assert out.shape == (args.prompts * args.samples, args.prompt_len + args.new_tokens)

    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    theirs()  # torch warm-up
    print(f"{n_params / 1e6:.1f}M params, {args.prompts * args.samples} sequences x {args.new_tokens} new tokens; "
          f"ours = grpo_jax.generate (first call incl. compile {compile_s:.1f}s), theirs = transformers generate")
    result = {
        "benchmark": "rollout", **perf.device_info(), "params": n_params, "sequences": args.prompts * args.samples,
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "grpo_jax_first_call_s": compile_s,
        **perf.compare(perf.time_runs(ours, args.repeats, 0), perf.time_runs(theirs, args.repeats, 0), n_tokens),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
