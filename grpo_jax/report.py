"""The report of an ablation grid (``grpo-jax ablate``): each run's metrics reduced to one number per table column
(``reduce_metric``), the seeds summarised with bootstrap intervals and paired differences (``markdown``, through
``grpo_jax.stats``), and the plots with seed bands (``plot``).
"""
from __future__ import annotations

import fnmatch
import json
import re
from typing import TYPE_CHECKING

import numpy as np

from grpo_jax import stats, storage
from grpo_jax.tracking import read_metrics

if TYPE_CHECKING:
    from grpo_jax.ablate import AblationConfig, Reduce


def _series(rows: list[dict], metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    clock = np.cumsum([r.get("time/step_s", 0.0) for r in rows])
    pts = [((clock[i] if x == "time" else r["step"]), r[metric]) for i, r in enumerate(rows)
           if isinstance(r.get(metric), float)]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))


REACH = re.compile(r"(steps|time)_to_(-?[0-9.]+)")


def _reach(rows: list[dict], metric: str, window: int, level: float, x: str) -> float:
    """The step (or the summed ``time/step_s`` up to it) at which the mean of the metric over the last ``window``
    logged values first reaches ``level``; nan if it never does."""
    steps, v = _series(rows, metric, "step")
    clock = dict(zip((r["step"] for r in rows), np.cumsum([r.get("time/step_s", 0.0) for r in rows])))
    for i in range(v.size):
        if v[max(0, i + 1 - window):i + 1].mean() >= level:
            return float(steps[i] if x == "steps" else clock[steps[i]])
    return float("nan")


def reduce_metric(rows: list[dict], reduce: Reduce, metric: str, window: int) -> float:
    """``reduce`` of the metric over a run (``AblationConfig``), or ``steps_to_<level>``/``time_to_<level>``: when
    its trailing ``window`` mean first reaches level (convergence speed)."""
    if (reach := REACH.fullmatch(reduce)) is not None:
        return _reach(rows, metric, window, float(reach.group(2)), reach.group(1))
    _, v = _series(rows, metric, "step")
    if v.size == 0:
        return float("nan")
    return float({"initial": v[0], "final": v[-1], "first": v[:window].mean(), "last": v[-window:].mean(),
                  "mean": v.mean(), "median": np.median(v), "min": v.min(), "sum": v.sum()}[reduce])


def _expand(patterns, all_rows: list[list[dict]]) -> list[str]:
    names = sorted({k for rows in all_rows for r in rows for k in r})
    out = []
    for pattern in patterns:
        out += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in out] or [pattern]
    return out


def summarize(ab: AblationConfig, dirs: dict[str, dict[int, storage.Location]]) -> dict[str, dict[str, list[float]]]:
    """{variant: {"reduce:metric": [value per seed]}} plus "wall_s" (each run's wall time)."""
    rows_of = {d: read_metrics(d) for seeds in dirs.values() for d in seeds.values()}
    columns = [f"{e.partition(':')[0]}:{m}" for e in ab.table for m in _expand([e.partition(":")[2]], rows_of.values())]
    table: dict[str, dict[str, list[float]]] = {}
    for name, seeds in dirs.items():
        table[name] = {c: [] for c in [*columns, "wall_s"]}
        for run_dir in seeds.values():
            rows = rows_of[run_dir]
            for c in columns:
                reduce, _, metric = c.partition(":")
                table[name][c].append(reduce_metric(rows, reduce, metric, ab.window))
            summary = run_dir / "summary.json"
            table[name]["wall_s"].append(
                json.loads(summary.read_text())["wall_s"] if summary.exists() else float("nan"))
    return table


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else (f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}")


def _interval(iv: stats.Interval) -> str:
    return _fmt(iv.mean) if iv.n < 2 else f"{_fmt(iv.mean)} [{_fmt(iv.lo)}, {_fmt(iv.hi)}]"


def markdown(ab: AblationConfig, table: dict[str, dict[str, list[float]]], seeds_used) -> str:
    """The report: per variant and column the seed mean, its 95% bootstrap interval over seeds and each seed's value;
    with an ``anchor``, each variant's ratio of means to it and its paired per-seed difference with an interval
    (``grpo_jax.stats``)."""
    columns = list(next(iter(table.values())))
    head = f"| variant | {' | '.join(columns)} |\n|{' --- |' * (len(columns) + 1)}\n"
    cell = lambda vs: f"{_interval(stats.bootstrap(vs))} ({', '.join(_fmt(v) for v in vs)})"  # noqa: E731
    text = head + "".join(f"| {name} | {' | '.join(cell(row[c]) for c in columns)} |\n" for name, row in table.items())
    text = (f"Mean over seeds {list(seeds_used)} [95% bootstrap interval over the seeds] (each seed's value). "
            f"`initial:`/`final:` the value at the run's first/last step that logs it, `first:`/`last:` the mean of "
            f"the first/last {ab.window} steps, `mean:`/`median:`/`min:`/`sum:` over all steps; wall_s is each run's "
            f"wall time (compilation, evaluation and, for the run that trained it, the shared warm start "
            f"included).\n\n") + text
    if ab.anchor is not None:
        base = {c: float(np.mean(v)) for c, v in table[ab.anchor].items()}
        ratio = lambda name, c: float(np.mean(table[name][c])) / base[c] if base[c] else float("nan")  # noqa: E731
        text += (f"\nRatio of each variant's seed mean to `{ab.anchor}`'s:\n\n{head}"
                 + "".join(f"| {n} | {' | '.join(_fmt(ratio(n, c)) for c in columns)} |\n" for n in table))

        def diff(name, c):
            iv = stats.paired(table[name][c], table[ab.anchor][c])
            return _interval(iv) + (" *" if iv.excludes(0.0) else "")

        text += (f"\nPaired difference to `{ab.anchor}` (variant - {ab.anchor}, seed by seed: same seed, same warm "
                 f"start), mean [95% bootstrap interval]; * where the interval excludes 0:\n\n{head}"
                 + "".join(f"| {n} | {' | '.join(diff(n, c) for c in columns)} |\n" for n in table if n != ab.anchor))
    return text


def plot(ab: AblationConfig, dirs: dict[str, dict[int, storage.Location]], report: storage.Location) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: [read_metrics(d) for d in seeds.values()] for name, seeds in dirs.items()}
    files = []
    for spec in ab.plots:
        metrics = _expand(spec.metrics, [r for rs in runs.values() for r in rs])
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for name, seed_rows in runs.items():
                series = [_series(rows, metric, spec.x) for rows in seed_rows]
                n = min(len(v) for _, v in series)
                if n == 0:
                    continue
                x = np.mean([s[0][:n] for s in series], axis=0)
                ys = np.array([s[1][:n] for s in series])
                (line,) = ax.plot(x, ys.mean(0), marker="o" if n < 12 else None, ms=3, label=name)
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
            ax.set_title(metric, fontsize=9)
            ax.set_xlabel("step" if spec.x == "step" else "wall time of the steps (s)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = report / spec.file
        with path.open("wb") as f:  # through the path layer: report may be gs://
            fig.savefig(f, format="png", dpi=90)
        plt.close(fig)
        files.append(path)
    return files
