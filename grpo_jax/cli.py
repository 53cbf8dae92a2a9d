"""Command line: ``grpo-jax <command> ...``."""
from __future__ import annotations

import argparse
import inspect
import sys

from grpo_jax import config, presets


def _cmd_presets(args: argparse.Namespace) -> int:
    names = args.names or sorted(presets.PRESETS)
    for name in names:
        cfg = presets.AlgoConfig.from_preset(name)
        print(f"# {name}: {inspect.getdoc(presets.PRESETS[name])}\n{config.to_yaml(cfg)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-jax", description="GRPO and its descendants in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the algorithm presets (formula, source, resolved config)")
    p.add_argument("names", nargs="*", help=f"any of {sorted(presets.PRESETS)} (default: all)")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config.ConfigError as e:
        print(f"grpo-jax: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
