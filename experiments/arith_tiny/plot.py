"""Learning curves of arith_tiny runs: ``python experiments/arith_tiny/plot.py RUN_DIR [RUN_DIR ...] [-o PNG]``.

Plots, per run: the training reward (= accuracy on the sampled rollouts) and the held-out greedy accuracy over GRPO
steps, with the warm-start accuracy at step 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "learning_curve.png")
    args = ap.parse_args(argv)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in args.runs:
        rows = read(run)
        train = [r for r in rows if "reward/total/mean" in r]
        evals = [r for r in rows if "eval/accuracy" in r]
        ax_train.plot([r["step"] for r in train], [r["reward/total/mean"] for r in train], label=run.name, alpha=0.8)
        ax_eval.plot([r["step"] for r in evals], [100 * r["eval/accuracy"] for r in evals], "o-", label=run.name)
    ax_train.set(title="training reward (sampled, T=1)", xlabel="GRPO step", ylabel="mean reward")
    ax_eval.set(title="held-out greedy accuracy", xlabel="GRPO step (0 = after warm start)", ylabel="accuracy (%)")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
