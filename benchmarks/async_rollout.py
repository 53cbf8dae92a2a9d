"""Steps/s of ``rollout.mode`` one_step_off (and async) against sync on ``experiments/arith_tiny``, with a reward
of fixed latency per batch (issue 16: an external judge or sandbox, simulated with a sleep).

    python benchmarks/async_rollout.py                    # sync vs one_step_off, 0.3 s per batch, 2 rounds x 10 steps
    python benchmarks/async_rollout.py --modes sync one_step_off async   # async with rollout.max_staleness=2
    python benchmarks/async_rollout.py --latency 0        # no judge: what overlapping the compute alone gives
    python benchmarks/async_rollout.py --tiny             # ~30 s smoke run: random weights, 4 x G 4, 0.05 s judge

Workload: ``experiments/arith_tiny`` as it is (0.6M-param Qwen2, char tokenizer, 32 prompts x G 8, 8 new tokens,
``exact_int``) but with a 100-step supervised warm start instead of 3000 (speed hardly depends on the weights;
the completions still have the answer format), no evaluation, no checkpoint before the end, one device. The
judge: each worker process replaces ``grpo_jax.sampling.score`` (which ``loop.rollout_stage`` calls in the main
thread in sync, and ``sampling.produce`` in the background rollout thread otherwise, both through the module global)
with one that sleeps ``--latency`` seconds after scoring each batch; ``time/reward_s`` includes the sleep.

Each mode runs ``loop.train`` in its own process (one per round, modes alternating; the warm start is trained
in the first process and copied into the later run directories). A step's wall time is end to end: the time
between ``loop.record`` being entered for the step before and for this one, so a pipelined step counts the wait
for its batch; the first ``--warmup`` steps (compilation) are excluded. steps/s = measured steps / their total
time; the ratio against sync uses the medians of the per-step times (the ratio of the steps/s is printed too).
``time/step_s`` in metrics.jsonl is the main thread's step alone and would flatter the pipelined modes, so it is
not used. What to expect: a sync step is rollout + reward (with the latency) + prep + train; a one_step_off step
is about the larger of prep + train (main thread) and rollout + reward (rollout thread), plus what the two
threads take from each other on the shared cores, so the ratio is at most (sync step) / (prep + train).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_jax.start import with_cpu_devices

EXPERIMENT = Path(__file__).parents[1] / "experiments" / "arith_tiny"
PHASES = ("rollout_s", "reward_s", "rollout_wait_s", "weight_sync_s", "prep_s", "train_s")
COMMON = ["eval.every=0", "eval.num_examples=0", "checkpoint.every=1000000",
          "checkpoint.export_hf=false", "mesh.num_devices=1"]
WARM = ["warm_start.sft.steps=100"]
TINY = ["warm_start=null", "data.num_examples=400", "train.batch_prompts=4", "rollout.group_size=4"]
MODE_SETS = {"sync": [], "one_step_off": ["rollout.mode=one_step_off"],
             "async": ["rollout.mode=async", "rollout.max_staleness=2"]}


def overrides(mode: str, total_steps: int, tiny: bool) -> list[str]:
    return COMMON + (TINY if tiny else WARM) + MODE_SETS[mode] + [f"train.steps={total_steps}"]


def worker(mode: str, shared: str, warmup: int, steps: int, latency: float, tiny: bool) -> dict:
    """One ``loop.train`` run of ``mode`` with the slow judge; per measured step its end-to-end wall time, phase
    times, staleness and the compile count."""
    import jax

    from grpo_jax import loop, sampling
    from grpo_jax.experiment import load_experiment

    jax.config.update("jax_compilation_cache_dir", os.path.join(shared, "xla"))  # later processes skip compiling
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    score, record, ends, logged = sampling.score, loop.record, [], []

    def judged(run, col):
        out = score(run, col)
        time.sleep(latency)
        return out

    def timed(run, rs, done, metrics, summary):
        ends.append(time.perf_counter())  # the step is done; record's writes count towards the next one
        stop = record(run, rs, done, metrics, summary)
        logged.append({k: float(metrics.get(f"time/{k}", 0.0)) for k in PHASES}
                      | {"staleness": float(metrics.get("rollout/staleness", 0)), "compiles": metrics["compiles"]})
        return stop

    sampling.score, loop.record = judged, timed
    run_dir = Path(tempfile.mkdtemp(dir=shared, prefix=f"{mode}-"))
    warm = Path(shared) / "warm_start"
    if warm.exists():
        shutil.copytree(warm, run_dir / "warm_start")
    cfg = load_experiment(EXPERIMENT, overrides(mode, warmup + steps, tiny))
    loop.train(cfg, run_dir, show_progress=False)
    if not warm.exists() and (run_dir / "warm_start").exists():
        shutil.copytree(run_dir / "warm_start", warm)
    walls = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    measured = logged[warmup:]
    return {"step_s": walls, "total_s": ends[-1] - ends[warmup - 1],
            **{k: [m[k] for m in measured] for k in PHASES + ("staleness",)},
            "recompiles": measured[-1]["compiles"] - logged[warmup - 1]["compiles"]}


def side(mode: str, shared: str, warmup: int, steps: int, latency: float, tiny: bool) -> dict:
    """One mode's worker in a fresh process (one CPU device); its JSON result."""
    cmd = [sys.executable, __file__, "--worker", mode, "--shared", shared, "--warmup", str(warmup),
           "--steps", str(steps), "--latency", str(latency)] + (["--tiny"] if tiny else [])
    env = with_cpu_devices(os.environ, 1)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    walls = [w for r in runs for w in r["step_s"]]
    n, total = len(walls), sum(r["total_s"] for r in runs)
    return {"step_s": {"min": min(walls), "median": statistics.median(walls)}, "steps": n,
            "steps_per_s": n / total, "steps_per_s_median": 1 / statistics.median(walls),
            "phases_median_s": {k: statistics.median(x for r in runs for x in r[k]) for k in PHASES},
            "staleness_mean": statistics.mean(x for r in runs for x in r["staleness"]),
            "recompiles_after_warmup": [r["recompiles"] for r in runs]}


def compare(modes: list[str], rounds: int, warmup: int, steps: int, latency: float, tiny: bool) -> dict:
    shared = tempfile.mkdtemp(prefix="grpo-bench-async-")
    try:
        runs = {m: [] for m in modes}
        for r in range(rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                runs[mode].append(side(mode, shared, warmup, steps, latency, tiny))
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    result = {"latency_s": latency, "rounds": rounds, "warmup": warmup, "steps_per_round": steps, "tiny": tiny,
              "overrides": COMMON + (TINY if tiny else WARM), "modes": {m: summarise(rs) for m, rs in runs.items()}}
    sync, modes = result["modes"]["sync"], result["modes"].items()
    result["speedup_vs_sync"] = {m: sync["step_s"]["median"] / s["step_s"]["median"] for m, s in modes}
    result["speedup_vs_sync_total"] = {m: s["steps_per_s"] / sync["steps_per_s"] for m, s in modes}
    return result


def show(r: dict) -> None:
    print(f"\nexperiments/arith_tiny, reward latency {r['latency_s']} s per batch; {r['rounds']} rounds x "
          f"{r['steps_per_round']} measured steps per mode after {r['warmup']} warm-up steps")
    for mode, s in r["modes"].items():
        p = s["phases_median_s"]
        print(f"  {mode:13s} step {s['step_s']['median']:.3f} s median ({s['step_s']['min']:.3f} min), "
              f"{s['steps_per_s']:.2f} steps/s; staleness {s['staleness_mean']:.2f}; "
              f"x{r['speedup_vs_sync'][mode]:.2f} vs sync (medians; x{r['speedup_vs_sync_total'][mode]:.2f} "
              "by total time)")
        print("                phases (medians, s): " + ", ".join(f"{k[:-2]} {p[k]:.3f}" for k in PHASES))


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", choices=list(MODE_SETS), default=["sync", "one_step_off"])
    ap.add_argument("--latency", type=float, default=0.3, help="seconds the judge sleeps per scored batch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 1 round x 3 steps, tiny batch, 0.05 s judge")
    ap.add_argument("--worker", choices=list(MODE_SETS), help=argparse.SUPPRESS)
    ap.add_argument("--shared", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.shared, args.warmup, args.steps, args.latency, args.tiny)))
        return None
    if "sync" not in args.modes:
        ap.error("--modes needs sync (the anchor)")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if args.tiny:
        result = compare(args.modes, 1, 2, 3, 0.05, True)
    else:
        result = compare(args.modes, args.rounds, args.warmup, args.steps, args.latency, False)
    show(result)
    print(json.dumps({"benchmark": "async_rollout", "device": "cpu", **result}))
    return result


if __name__ == "__main__":
    main()
