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
import json
import logging
import time
from pathlib import Path
from typing import Literal

from grpo_jax import config as config_lib
from grpo_jax import storage
from grpo_jax.experiment import ExperimentConfig, load_experiment
from grpo_jax.report import REACH, markdown, plot, reduce_metric, summarize  # noqa: F401 (the API)
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
    ``sum:time/step_s`` is the RL steps' wall time without warm start and evaluation); ``steps_to_<level>`` /
    ``time_to_<level>`` when the trailing ``window`` mean first reaches level (e.g.
    ``steps_to_0.6:accuracy``). ``anchor`` (a variant) adds
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
            if (reduce not in REDUCES and not REACH.fullmatch(reduce)) or not metric:
                raise ValueError(f"ablation.table entry {entry!r}: write reduce:metric, reduce in {'|'.join(REDUCES)}"
                                 " or steps_to_<level>|time_to_<level>")
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
