"""Command line: ``grpo-jax train|eval|ablate|presets ...``.

``--run-dir`` names the output location of ``train``, ``eval`` and ``ablate`` alike: a local folder or
``gs://bucket/path`` (``grpo_jax.storage``).

Exit codes: 0 done, 2 config error, 3 non-finite loss, 4 checkpoints that exist but none restores, 143 preempted.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from grpo_jax import config, presets, storage


def _machine_tag() -> str:
    """jax version, platform and (on CPU) a hash of the CPU's feature flags: an XLA:CPU executable compiled for one
    CPU must never be loaded on another (a home directory shared between machines, or copied to a CI runner)."""
    import hashlib

    import jax

    device = jax.devices()[0]
    tag = f"{jax.__version__}-{device.platform}-{device.device_kind}"
    if device.platform == "cpu":
        try:
            flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        except (OSError, StopIteration):
            flags = os.uname().machine
        tag += "-" + hashlib.sha1(flags.encode()).hexdigest()[:10]
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in tag)


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache: a second run of the same experiment skips XLA compilation.

    ``GRPO_JAX_CACHE`` sets the directory (empty: off); the default is ``~/.cache/grpo_jax/xla/<machine tag>``.
    """
    import jax

    cache = os.environ.get("GRPO_JAX_CACHE")
    if cache is None:
        cache = str(Path.home() / ".cache" / "grpo_jax" / "xla" / _machine_tag())
    if not cache:
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def distributed_args(env: Mapping[str, str]) -> dict | None:
    """``jax.distributed.initialize`` keyword arguments from the environment, or None for a single-process run.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` describe
    the cluster explicitly. The address alone, or a multi-worker Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists
    several hosts), gives ``{}``: jax detects the rest itself (TPU, SLURM, Open MPI, Kubernetes).
    """
    address, num, pid = (env.get(k, "") for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    if not (num or pid):
        return {} if address or env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 else None
    if not (address and num and pid):
        missing = [k for k, v in (("JAX_COORDINATOR_ADDRESS", address), ("JAX_NUM_PROCESSES", num),
                                  ("JAX_PROCESS_ID", pid)) if not v]
        raise config.ConfigError(f"multi-host: JAX_NUM_PROCESSES and JAX_PROCESS_ID need JAX_COORDINATOR_ADDRESS "
                                 f"and each other; {', '.join(missing)} missing")
    try:
        num_processes, process_id = int(num), int(pid)
    except ValueError:
        raise config.ConfigError(f"multi-host: JAX_NUM_PROCESSES={num!r} and JAX_PROCESS_ID={pid!r} must be "
                                 "integers") from None
    if not 0 <= process_id < num_processes:
        raise config.ConfigError(f"multi-host: JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES="
                                 f"{num_processes})")
    return dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)


def _maybe_distributed() -> None:
    """Multi-host: join the JAX cluster when the environment describes one (see ``distributed_args``). Must run
    before anything touches the devices; CPU processes exchange collectives over gloo (jax's default)."""
    kwargs = distributed_args(os.environ)
    if kwargs is not None:
        import jax

        jax.distributed.initialize(**kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    from grpo_jax.checkpoint import CheckpointError
    from grpo_jax.experiment import load_experiment
    from grpo_jax.loop import NonFiniteLoss, Preempted, train

    cfg = load_experiment(args.experiment, args.overrides)  # config errors surface before any compute
    _maybe_distributed()
    _enable_compilation_cache()
    run_dir = args.run_dir or os.path.join("runs", Path(args.experiment).resolve().name)
    try:
        summary = train(cfg, run_dir, show_progress=not args.no_progress, restart=args.restart)
    except (Preempted, NonFiniteLoss, CheckpointError) as e:
        print(f"grpo-jax: {e}", file=sys.stderr)
        return {Preempted: 143, NonFiniteLoss: 3, CheckpointError: 4}[type(e)]
    print(json.dumps({"run_dir": os.fspath(storage.location(run_dir)), **summary}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import jax

    from grpo_jax.data import build_splits
    from grpo_jax.evaluation import evaluate
    from grpo_jax.experiment import load_experiment
    from grpo_jax.models import load_hf
    from grpo_jax.rewards import RewardPool
    from grpo_jax.run_setup import load_tokenizer

    given = ([args.run_dir] if args.run_dir else []) + args.args
    if len(given) < 2 or "=" in given[1]:
        raise config.ConfigError("eval needs the model and the experiment: `grpo-jax eval --run-dir DIR EXPERIMENT` "
                                 "or `grpo-jax eval MODEL EXPERIMENT`")
    model_arg, experiment, *overrides = given
    cfg = load_experiment(experiment, overrides)
    _enable_compilation_cache()
    folder = storage.location(model_arg)
    folder = folder / "final" if (folder / "final" / "config.json").exists() else folder
    local = storage.local_copy(folder)  # one download of a gs:// model, for the weights and the tokenizer
    mesh = cfg.mesh.build()
    tokenizer = load_tokenizer(cfg.model) if cfg.model.tokenizer == "char" else _folder_tokenizer(Path(local), cfg)
    model = load_hf(local, dtype=cfg.model.dtype, mesh=mesh)
    held_out = build_splits(cfg.data, tokenizer).held_out[: cfg.eval.num_examples]
    if not held_out:
        raise config.ConfigError("data: the experiment has no held-out split "
                                 "(set data.held_out_fraction or held_out_source)")
    with RewardPool(cfg.rewards.num_workers) as pool:
        result = evaluate(model, tokenizer, held_out, rewards=cfg.rewards, correct_reward=cfg.correct_reward,
                          max_new_tokens=cfg.rollout.max_new_tokens, batch_prompts=cfg.eval.batch_prompts,
                          pass_k=cfg.eval.pass_k, temperature=cfg.rollout.temperature, key=jax.random.key(cfg.seed),
                          pool=pool, mesh=mesh,
                          min_prompt_bucket=cfg.rollout.min_prompt_bucket)
    report = json.dumps({"model": os.fspath(folder), "examples": len(held_out), **result})
    if args.run_dir:
        (storage.location(args.run_dir) / "eval.json").write_text(report + "\n")
    print(report)
    return 0


def _folder_tokenizer(folder: Path, cfg):
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    from grpo_jax.run_setup import load_tokenizer

    return load_tokenizer(cfg.model)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from grpo_jax.ablate import ablate

    _enable_compilation_cache()
    print(json.dumps(ablate(args.experiment, out=args.run_dir, quick=args.quick, overrides=args.overrides,
                            grid_file=args.grid)))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    names = args.names or sorted(presets.PRESETS)
    for name in names:
        cfg = presets.PRESETS[name]()
        print(f"# {name}: {inspect.getdoc(presets.PRESETS[name])}\n{config.to_yaml(cfg)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-jax", description="GRPO and its descendants in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run (or resume) an experiment folder")
    p.add_argument("experiment", help="experiments/<name> (holding config.yaml) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.loss.beta=0.0 train.steps=20")
    p.add_argument("--run-dir", help="where config, metrics, checkpoints and the final model go: a folder or "
                   "gs://bucket/path (default runs/<name>)")
    p.add_argument("--restart", action="store_true", help="discard the run dir's checkpoints and metrics and start "
                   "from step 0 (without it a run resumes, and stops if its checkpoints cannot be read)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="held-out greedy accuracy (and pass@k, maj@k) of a run dir or HF folder",
                       usage="grpo-jax eval (--run-dir DIR | MODEL) EXPERIMENT [overrides ...]")
    p.add_argument("args", nargs="+", metavar="[MODEL] EXPERIMENT [overrides]",
                   help="MODEL: an HF model folder or a run dir (its final/ model), local or gs://, when --run-dir "
                   "is not given; EXPERIMENT: experiments/<name> (the task, rewards and eval settings)")
    p.add_argument("--run-dir", help="the run to evaluate (its final/ model); the result is also written to "
                   "<run-dir>/eval.json")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("ablate", help="run an experiment's ablation.yaml grid; write results.md and plots")
    p.add_argument("experiment", help="experiments/<name> holding config.yaml and ablation.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--run-dir", "--out", dest="run_dir", help="runs and report go here, a folder or gs://bucket/path "
                   "(default runs/<name>, runs/<name>_quick with --quick); --out is the old name")
    p.add_argument("--quick", action="store_true", help="the grid with ablation.yaml's quick overrides (a smoke run)")
    p.add_argument("--grid", help="another grid file instead of <experiment>/ablation.yaml (a path or a name in the "
                   "experiment folder); the default run dir becomes runs/<name>_<file stem>")
    p.set_defaults(func=_cmd_ablate)
    p = sub.add_parser("presets", help="print the algorithm presets (formula, source, resolved config)")
    p.add_argument("names", nargs="*", help=f"any of {sorted(presets.PRESETS)} (default: all)")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options: `train X --run-dir D a.b=1`
    positional = next((name for name in ("overrides", "args") if hasattr(args, name)), None)
    if extra and (positional is None or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, positional, [*getattr(args, positional), *extra])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # gcsfs logs every read at INFO
    try:
        return args.func(args)
    except config.ConfigError as e:
        print(f"grpo-jax: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
