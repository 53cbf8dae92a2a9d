"""A full GRPO step of grpo_jax against TRL's ``GRPOTrainer`` on the same model folder and workload.

    pip install -e '.[bench]'                       # TRL and torch (CPU) for the anchor
    python benchmarks/step_vs_trl.py                # standard + long shape, 2 rounds, 5 measured steps per side
    python benchmarks/step_vs_trl.py --shape standard --rounds 3 --steps 8
    python benchmarks/step_vs_trl.py --devices 1    # grpo_jax on one CPU device (default: 2, as TRL's 2 threads)
    python benchmarks/step_vs_trl.py --tiny         # seconds-long smoke run (tests/test_benchmarks.py)

The workload (the standard one of ``shared/perf/workload.md``): a random Qwen2 (vocab 512, E 128, F 384, 4 layers,
4 heads, 2 KV heads, tied embeddings, float32, torch seed 0) saved with ``save_pretrained`` beside a character-level
tokenizer; prompts ``"47+38="`` (6 tokens); 8 prompts x G 8 per step, 32 new tokens at T = 1 (no top-k/top-p),
token-mean loss (TRL ``loss_type="dapo"``, ours the ``bnpo`` preset), clip 0.2, beta 0.04 with a frozen
reference (k3), AdamW lr 1e-5 without decay or warmup, gradient clipping at 1.0; one update per rollout. The long
shape: 64-token prompts, G 16, 128 new tokens. Random weights rarely emit EOS, so nearly every row runs the full
length on both sides.

Each side runs in its own process (torch's and XLA's CPU thread pools slow each other down in one process), one
process per round, sides alternating, both with the glibc tunable the ``grpo-jax`` command starts with
(``grpo_jax.start``: transparent huge pages for large allocations); warm-up steps (compilation) are excluded. A step
is wall time from before generation to after the optimizer update, as TRL's ``on_step_begin``..``on_step_end``. Ours
also prints the phase split and the update's time against the reference forward of the same batch (a model's
forward + backward + AdamW is ~3-4x its forward).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from grpo_jax.start import with_cpu_devices, with_huge_pages

SHAPES = {  # prompt tokens, G, new tokens, prompts per step
    "standard": dict(prompt_len=6, group=8, new_tokens=32, prompts=8),
    "long": dict(prompt_len=64, group=16, new_tokens=128, prompts=8),
    "tiny": dict(prompt_len=6, group=4, new_tokens=8, prompts=2),
}
MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
BETA, CLIP, LR, THREADS = 0.04, 0.2, 1e-5, 2
CHARS = "0123456789+-*=? abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_folder(folder: str, shape: dict) -> None:
    """The model (torch seed 0) and the character tokenizer saved to ``folder``, and 64 prompts as jsonl."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: 3 + i for i, c in enumerate(CHARS)}
    vocab |= {f"<x{i}>": len(vocab) + i for i in range(MODEL["vocab_size"] - len(vocab))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                            padding_side="left").save_pretrained(folder)
    torch.manual_seed(0)
    context = shape["prompt_len"] + shape["new_tokens"]
    config = Qwen2Config(**MODEL, max_position_embeddings=max(128, context), dtype="float32")
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    rng = random.Random(0)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for _ in range(64):
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(shape["prompt_len"] - 6))
            f.write(json.dumps({"question": f"{filler}{a}+{b}=", "answer": f"#### {a + b}"}) + "\n")


def trl_worker(folder: str, shape: dict, warmup: int, steps: int) -> dict:
    """TRL 1.16 ``GRPOTrainer`` on torch CPU; step times from its callbacks, generate timed by a wrapper."""
    import torch
    import transformers
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    data = load_dataset("json", data_files=os.path.join(folder, "prompts.jsonl"), split="train")
    data = data.map(lambda r: {"prompt": r["question"], "target": r["answer"].split()[-1]})

    def correct(completions, target, **_):
        return [float(c.strip().split(" ")[0] == t) for c, t in zip(completions, target)]

    gen_s, step_s, t0 = [], [], [0.0]
    generate = model.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        gen_s.append(time.perf_counter() - start)
        return out

    model.generate = timed_generate

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            t0[0] = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s.append(time.perf_counter() - t0[0])

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, fp16=False, seed=0, report_to="none",
                     save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, max_steps=warmup + steps,
                     per_device_train_batch_size=shape["prompts"] * shape["group"], gradient_accumulation_steps=1,
                     num_generations=shape["group"], max_completion_length=shape["new_tokens"], temperature=1.0,
                     beta=BETA, epsilon=CLIP, loss_type="dapo", num_iterations=1, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                     max_grad_norm=1.0, use_vllm=False, log_completions=False, dataloader_num_workers=0)
    GRPOTrainer(model=model, args=cfg, reward_funcs=correct, train_dataset=data, processing_class=tokenizer,
                callbacks=[Timer()]).train()
    return {"step_s": step_s[warmup:], "rollout_s": gen_s[warmup:]}


def jax_config(folder: str, shape: dict, total_steps: int, devices: int = 1) -> dict:
    """The same workload as an experiment config (``grpo-jax train`` would run it as well)."""
    return {
        "seed": 0,
        "model": {"path": folder, "scan_layers": False},
        "data": {"task": "gsm8k", "source": os.path.join(folder, "prompts.jsonl"), "template": "{question}"},
        "rewards": {"fns": [{"name": "exact_int"}], "num_workers": 1},
        "algo": {"preset": "bnpo", "loss": {"beta": BETA, "clip_low": CLIP}},
        "rollout": {"group_size": shape["group"], "max_new_tokens": shape["new_tokens"], "temperature": 1.0,
                    "min_prompt_bucket": 1},
        "train": {"steps": total_steps, "batch_prompts": shape["prompts"]},
        "optim": {"lr": LR, "max_grad_norm": 1.0},
        "eval": {"num_examples": 0},
        "checkpoint": {"every": 10**6, "export_hf": False, "async_save": False},
        "mesh": {"data": devices, "num_devices": devices},
    }


def jax_worker(folder: str, shape: dict, warmup: int, steps: int, overrides: list[str]) -> dict:
    """grpo_jax's own loop stages (``train_one_step``: rollout, rewards, reference, update) on the process's CPU
    devices (``mesh.data`` over all of them); then the reference forward and the update alone on the last step's
    batch, alternating."""
    import jax
    import yaml

    from grpo_jax import loop, sampling
    from grpo_jax.experiment import load_experiment
    from grpo_jax.run import build_run
    from grpo_jax.tracking import compile_count

    run_dir = tempfile.mkdtemp()
    with open(os.path.join(run_dir, "bench.yaml"), "w") as f:
        yaml.safe_dump(jax_config(folder, shape, warmup + steps, jax.device_count()), f)
    cfg = load_experiment(os.path.join(run_dir, "bench.yaml"), overrides)
    run, rs, _ = build_run(cfg, os.path.join(run_dir, "run"))
    phases = {k: [] for k in ("step_s", "rollout_s", "reward_s", "prep_s", "train_s")}
    compiled = compile_count()
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            rs, metrics = loop.train_one_step(run, rs, step, first=False)
            wall = time.perf_counter() - start
            if step == warmup - 1:
                compiled = compile_count()
            if step >= warmup:
                phases["step_s"].append(wall)
                for k in ("rollout_s", "reward_s", "prep_s", "train_s"):
                    phases[k].append(metrics[f"time/{k}"])
        col, rs = sampling.collect(run, rs, warmup + steps)
        batch, rs, _ = loop.assemble(run, rs, sampling.score(run, col)[0])
        ref_s, update_s, state = [], [], rs.train
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(run.ref_logprobs(rs.ref_params, batch.tokens_BxS, batch.attn_mask_BxS))
            ref_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            state, m = run.train_step(state, batch)
            jax.block_until_ready(m)
            update_s.append(time.perf_counter() - start)
        recompiles = compile_count() - compiled  # after the warm-up steps, the loop and the timed calls
    finally:
        run.close()
    return phases | {"ref_forward_s": ref_s, "update_s": update_s, "recompiles": recompiles}


def side(name: str, folder: str, shape_name: str, warmup: int, steps: int, overrides: list[str],
         devices: int = 1) -> dict:
    """One side's worker in a fresh process (grpo_jax's on ``devices`` CPU devices); its JSON result."""
    cmd = [sys.executable, __file__, "--worker", name, "--folder", folder, "--shape", shape_name,
           "--warmup", str(warmup), "--steps", str(steps)] + [a for o in overrides for a in ("--set", o)]
    env = with_huge_pages(os.environ) | dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                                             WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false")
    # grpo_jax data parallel over the CPU's cores, each host device one thread of work
    env = with_cpu_devices(env, devices if name == "jax" else 1)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times)}


def compare(shape_name: str, rounds: int, warmup: int, steps: int, overrides: list[str], devices: int = 1) -> dict:
    shape = SHAPES[shape_name]
    folder = tempfile.mkdtemp(prefix=f"grpo-bench-{shape_name}-")
    build_folder(folder, shape)
    runs = {"trl": [], "jax": []}
    for r in range(rounds):
        for name in (("trl", "jax") if r % 2 == 0 else ("jax", "trl")):
            runs[name].append(side(name, folder, shape_name, warmup, steps, overrides, devices))
    merged = {name: {k: [x for run in rs for x in run[k]] for k in rs[0] if isinstance(rs[0][k], list)}
              for name, rs in runs.items()}
    trl, ours = merged["trl"], merged["jax"]
    result = {"shape": shape_name, **shape, "rounds": rounds, "steps_per_round": steps, "overrides": overrides,
              "devices": devices,
              "trl": {k: summary(v) for k, v in trl.items()}, "grpo_jax": {k: summary(v) for k, v in ours.items()},
              "recompiles_after_warmup": [run["recompiles"] for run in runs["jax"]]}
    result["speedup_median"] = result["trl"]["step_s"]["median"] / result["grpo_jax"]["step_s"]["median"]
    result["speedup_min"] = result["trl"]["step_s"]["min"] / result["grpo_jax"]["step_s"]["min"]
    result["update_over_ref_forward"] = (result["grpo_jax"]["update_s"]["median"]
                                         / result["grpo_jax"]["ref_forward_s"]["median"])
    return result


def show(r: dict) -> None:
    t, j = r["trl"], r["grpo_jax"]
    print(f"\n{r['shape']}: {r['prompts']} prompts x G {r['group']}, prompt {r['prompt_len']} tokens, "
          f"{r['new_tokens']} new tokens; {r['rounds']} rounds x {r['steps_per_round']} steps per side")
    print(f"  TRL      step {t['step_s']['median']:.3f} s median ({t['step_s']['min']:.3f} min); "
          f"generate {t['rollout_s']['median']:.3f}")
    print(f"  grpo_jax step {j['step_s']['median']:.3f} s median ({j['step_s']['min']:.3f} min), {r['devices']} CPU "
          f"device(s); "
          + ", ".join(f"{k[:-2]} {j[k]['median']:.3f}" for k in ("rollout_s", "reward_s", "prep_s", "train_s")))
    print(f"  speed-up (TRL s / ours s): {r['speedup_median']:.2f}x median, {r['speedup_min']:.2f}x min")
    print(f"  update {j['update_s']['median'] * 1e3:.1f} ms = {r['update_over_ref_forward']:.2f}x the reference "
          f"forward of the same batch ({j['ref_forward_s']['median'] * 1e3:.1f} ms)")


def main(argv: list[str] | None = None) -> list[dict] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["standard", "long", "both", "tiny"], default="both")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[],
                    help="an override of grpo_jax's config, e.g. train.log_entropy=false (repeatable)")
    ap.add_argument("--devices", type=int, default=THREADS,
                    help="grpo_jax's CPU devices (host devices, mesh.data over them), default as many as TRL's threads")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--worker", choices=["trl", "jax"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape = SHAPES[args.shape]
        result = (trl_worker(args.folder, shape, args.warmup, args.steps) if args.worker == "trl"
                  else jax_worker(args.folder, shape, args.warmup, args.steps, args.set))
        print(json.dumps(result))
        return None
    if args.tiny:
        results = [compare("tiny", 1, 1, 1, args.set, args.devices)]
    else:
        shapes = ["standard", "long"] if args.shape == "both" else [args.shape]
        results = [compare(s, args.rounds, args.warmup, args.steps, args.set, args.devices) for s in shapes]
    for r in results:
        show(r)
    print(json.dumps({"benchmark": "step_vs_trl", "device": "cpu", "results": results}))
    return results


if __name__ == "__main__":
    main()
