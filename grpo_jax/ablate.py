"""``grpo-jax ablate experiments/<name>``: run a grid of variants x seeds of one experiment, then write a results
table (markdown) and plots (PNG) from the runs' metrics.

The experiment folder holds its runnable ``config.yaml`` and an ``ablation.yaml`` (``AblationConfig``; ``--grid FILE``
runs another grid over the same config)::

    seeds: [0, 1]
    variants:                      # name -> dotted overrides of config.yaml
      grpo: [algo.preset=grpo]
      dr_grpo: [algo.preset=dr_grpo]
    common: [data.levels=[1,3]]    # overrides of every run (optional)
    quick: [train.steps=4]         # extra overrides for --quick (a smoke run of the whole grid)
    table: [final:eval/accuracy, last:length/incorrect_mean]
    plots: [{file: length.png, metrics: [length/correct_mean, length/incorrect_mean]}]

Runs go to ``<out>/<variant>/seed<k>`` (``out`` local or ``gs://``) and are resumed (or skipped when complete) by a
second call. Runs that share model, data, warm start and seed share one supervised warm start: the first run's
``warm_start/`` folder is copied into the others, which then skip the SFT (``run_setup.warm_start`` reuses a folder
that is there).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np

from grpo_jax import config as config_lib
from grpo_jax import stats, storage
from grpo_jax.experiment import ExperimentConfig, load_experiment
from grpo_jax.tracking import read_metrics

log = logging.getLogger(__name__)
Reduce = Literal["initial", "final", "first", "last", "mean", "median", "min", "sum"]
REDUCES = ("initial", "final", "first", "last", "mean", "median", "min", "sum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlotSpec:
    """One PNG: a panel per metric (glob patterns allowed), a line per variant (mean over seeds, band = min..max),
    over training steps or over cumulative step wall time (``x: time``, the sum of ``time/step_s``)."""

    file: str
    metrics: tuple[str, ...]
    x: Literal["step", "time"] = "step"

    def __post_init__(self):
        if not self.file.endswith(".png") or "/" in self.file:
            raise ValueError(f"plots: file must be a plain name ending in .png, got {self.file!r}")
        if not self.metrics:
            raise ValueError(f"plots[{self.file}]: metrics must name at least one metric")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """The grid and its report. ``table`` entries are ``reduce:metric`` (metric may be a glob): ``initial``/``final``
    the value at the first/last step that has it (eval metrics; ``initial:eval/accuracy`` is the warm start's),
    ``first``/``last`` the mean over the first/last ``window`` steps that
    have it, ``mean``/``median``/``min``/``sum`` over all steps (median and min for timings: the first step compiles;
    ``sum:time/step_s`` is the RL steps' wall time without warm start and evaluation). ``anchor`` (a variant) adds
    a table of every variant's ratio to it."""

    seeds: tuple[int, ...] = (0, 1)
    variants: dict[str, tuple[str, ...]]
    common: tuple[str, ...] = ()  # overrides of every run, before the variant's (a setting the grid fixes)
    quick: tuple[str, ...] = ()
    quick_seeds: tuple[int, ...] | None = None
    table: tuple[str, ...] = ("final:eval/accuracy",)
    window: int = 10
    plots: tuple[PlotSpec, ...] = ()
    anchor: str | None = None

    def __post_init__(self):
        if not self.variants or not self.seeds:
            raise ValueError("ablation: variants and seeds must not be empty")
        bad = [v for v in self.variants if not v.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"ablation: variant names must be letters, digits, '_' or '-', got {bad}")
        for entry in self.table:
            reduce, _, metric = entry.partition(":")
            if reduce not in REDUCES or not metric:
                raise ValueError(f"ablation.table entry {entry!r}: write reduce:metric, reduce in {'|'.join(REDUCES)}")
        if self.window < 1:
            raise ValueError(f"ablation.window must be >= 1, got {self.window}")
        if self.anchor is not None and self.anchor not in self.variants:
            raise ValueError(f"ablation.anchor={self.anchor!r} is not a variant; variants: {list(self.variants)}")


def load_ablation(folder: Path, grid_file: str | Path | None = None) -> AblationConfig:
    """``folder``'s ablation.yaml, or ``grid_file`` (a path, or a name inside ``folder``) for a second grid over the
    same experiment."""
    path = Path(folder) / "ablation.yaml" if grid_file is None else Path(grid_file)
    if grid_file is not None and not path.is_file() and (Path(folder) / path).is_file():
        path = Path(folder) / path
    if not path.is_file():
        raise config_lib.ConfigError(f"{path}: no such file (an ablation needs experiments/<name>/ablation.yaml "
                                     "or --grid FILE)")
    return config_lib.from_yaml(AblationConfig, path)


def grid(folder: Path, ab: AblationConfig, *, quick: bool, overrides=()) -> list[tuple[str, int, ExperimentConfig]]:
    """(variant, seed, config) for every run, every config built (so any bad override fails before compute)."""
    seeds = (ab.quick_seeds or ab.seeds) if quick else ab.seeds
    extra = [*(ab.quick if quick else ()), *overrides]
    out = []
    for name, variant in ab.variants.items():
        for seed in seeds:
            try:
                cfg = load_experiment(folder, [*ab.common, *variant, *extra, f"seed={seed}"])
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"ablation variant {name!r}: {e}") from None
            out.append((name, seed, cfg))
    return out


def warm_key(cfg: ExperimentConfig) -> str | None:
    if cfg.warm_start is None:
        return None
    return json.dumps([config_lib.to_dict(x) for x in (cfg.model, cfg.data, cfg.warm_start)] + [cfg.seed],
                      sort_keys=True)


def run_grid(folder: Path, out: storage.Location, ab: AblationConfig, *, quick: bool,
             overrides=()) -> dict[str, dict[int, storage.Location]]:
    """Train every run of the grid (resuming unfinished ones); returns {variant: {seed: run_dir}}."""
    from grpo_jax.loop import train

    runs = grid(folder, ab, quick=quick, overrides=overrides)
    warm: dict[str, storage.Location] = {}
    dirs: dict[str, dict[int, storage.Location]] = {}
    for i, (name, seed, cfg) in enumerate(runs):
        run_dir = out / name / f"seed{seed}"
        dirs.setdefault(name, {})[seed] = run_dir
        key = warm_key(cfg)
        if key in warm and not (run_dir / "warm_start").exists():
            storage.copy_tree(warm[key] / "warm_start", run_dir / "warm_start")
        rows = read_metrics(run_dir)  # complete = every step logged and train() returned (its export written)
        if rows and rows[-1]["step"] == cfg.train.steps and (run_dir / "summary.json").exists():
            log.info("ablation: %s seed %d is complete; skipped", name, seed)
        else:
            log.info("ablation: run %d/%d: %s seed %d -> %s", i + 1, len(runs), name, seed, run_dir)
            t0 = time.perf_counter()
            summary = train(cfg, run_dir, show_progress=False)
            (run_dir / "summary.json").write_text(json.dumps({**summary, "wall_s": time.perf_counter() - t0}))
        if key is not None:
            warm.setdefault(key, run_dir)
    return dirs


def _series(rows: list[dict], metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    clock = np.cumsum([r.get("time/step_s", 0.0) for r in rows])
    pts = [((clock[i] if x == "time" else r["step"]), r[metric]) for i, r in enumerate(rows)
           if isinstance(r.get(metric), float)]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))


def reduce_metric(rows: list[dict], reduce: Reduce, metric: str, window: int) -> float:
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


def ablate(folder: str | Path, *, out: str | Path | None = None, quick: bool = False, overrides=(),
           grid_file: str | Path | None = None) -> dict:
    """Run the grid of ``folder``'s ablation.yaml (or ``grid_file``), then write ``results.md`` and the PNGs into
    ``out`` (default ``runs/<name>[_<grid file stem>][_quick]``)."""
    folder = Path(folder)
    ab = load_ablation(folder, grid_file)
    default = folder.resolve().name + (f"_{Path(grid_file).stem}" if grid_file is not None else "")
    out = storage.location(out or Path("runs") / (default + ("_quick" if quick else "")))
    out.mkdir(parents=True, exist_ok=True)
    dirs = run_grid(folder, out, ab, quick=quick, overrides=overrides)
    table = summarize(ab, dirs)
    seeds = (ab.quick_seeds or ab.seeds) if quick else ab.seeds
    (out / "results.md").write_text(f"# {folder.name}{' (--quick)' if quick else ''}\n\n" + markdown(ab, table, seeds))
    (out / "results.json").write_text(json.dumps(table, indent=1))
    files = plot(ab, dirs, out)
    return {"out": str(out), "results": str(out / "results.md"), "plots": [str(f) for f in files]}
