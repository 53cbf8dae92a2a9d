"""Forward-pass tokens/s of our NNX model vs transformers' torch model: same random config, weights and batch.

    python benchmarks/forward.py [--family qwen2|qwen3|llama] [--batch 8] [--length 256] [--runs 10] [--tiny]

The torch model is built with transformers, saved to a temp folder and loaded with ``load_hf``, so both sides
compute the same function (checked: max |logits difference| is printed). Each side gets warmup calls (jit compile
for us), then ``--runs`` timed calls; tokens/s is reported at the fastest (min time) and the median run, and the
ratio ours/torch of the medians. Last line: the same figures as JSON. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from grpo_jax import perf
from grpo_jax.models import load_hf

CONFIGS = {  # "small": the benchmark; "tiny": the smoke test
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
FAMILIES = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 16, 2 runs (smoke test)")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "small"
    batch, length, runs, warmup = (2, 16, 2, 1) if args.tiny else (args.batch, args.length, args.runs, args.warmup)

    torch.manual_seed(0)
    hf_cfg = FAMILIES[args.family](**CONFIGS[size], max_position_embeddings=max(length, 64))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf(folder)
    tokens = np.random.default_rng(0).integers(0, hf_cfg.vocab_size, (batch, length)).astype(np.int32)
    tokens_pt = torch.tensor(tokens, dtype=torch.long)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))

    def run_torch():
        with torch.inference_mode():
            return hf(tokens_pt).logits

    def run_ours():
        return jax.block_until_ready(forward(state, tokens))

    diff = float(np.abs(np.asarray(run_ours()) - run_torch().numpy()).max())
    n_tokens = batch * length
    report = {
        "benchmark": "forward", **perf.device_info(), "family": args.family, "config": size, "batch": batch,
        "length": length, "runs": runs, "torch_threads": torch.get_num_threads(), "max_abs_logits_diff": diff,
        **perf.compare(perf.time_runs(run_ours, runs, warmup), perf.time_runs(run_torch, runs, warmup), n_tokens),
    }
    print(f"ours = grpo_jax NNX, theirs = transformers torch; max |logits diff| {diff:.1e}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
