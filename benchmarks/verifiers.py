"""Seconds for each built-in text reward to score one adversarial completion of 200,000 characters.

    python benchmarks/verifiers.py [--chars 200000] [--repeats 3] [--limit 0.2]

Every built-in sample reward (``format`` in both modes) scores one completion of each adversarial family: runs of
tags, braces, digits, commas and ``\\boxed{`` that made the old regexes and extraction quadratic, and the inputs
found slowest for math-verify's own regexes (which see at most ``MATH_VERIFY_MAX_CHARS`` of them). A cell is the
fastest of ``--repeats`` calls (noise on a shared machine only adds time); the anchor is the same reward on
ordinary prose of the same length, measured in the same run, so the ratio shows whether a family costs more than
plain text does. Exits 1 if any cell is ``>= --limit`` seconds. ``length_penalty`` (scores token lengths, not
text) and ``reward_model`` (needs a checkpoint; its tokenizer input is cut to ``max_length`` tokens) are not text
verifiers and are listed as skipped. Last line: the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from grpo_jax import perf
from grpo_jax.rewards import get_reward, registered_rewards

FAMILIES = {  # name -> (prefix, unit): the completion is the prefix, then the unit repeated up to --chars characters
    "think_open": ("", "<think>"),
    "answer_open": ("", "<answer>"),
    "answer_close": ("", "</answer>"),
    "tag_pairs": ("", "<think></think> <answer>"),
    "think_newlines": ("", "<think>\n"),
    "strict_think_body": ("<think>\n", "a\n"),
    "strict_answer_body": ("<think>\nx\n</think>\n<answer>\n", "1\n"),
    "soft_whitespace": ("<think>", "</think>" + " " * 24),
    "soft_unclosed": ("<think>", "</think>\n<answer>"),
    "braces_open": ("", "{"),
    "braces_close": ("", "}"),
    "boxed_nested": ("\\boxed{", "{"),
    "boxed_open": ("", "\\boxed{"),
    "boxed_closed": ("", "\\boxed{1}"),
    "boxed_display": ("", "\\boxed{\\[}"),
    "answer_boxed": ("<answer>", "\\boxed{"),
    "digits": ("", "7"),
    "digits_spaced": ("", "7 "),
    "commas": ("", "1,"),
    "comma_groups": ("", "123,"),
    "decimals": ("", "1."),
    "dollars": ("", "$1$ and "),
    "display_open": ("", "\\["),
    "equals": ("<answer>", "="),
    "final_answer_runs": ("", "final answer is =$"),  # the slowest found for math-verify's regexes
    "dollar_answer_runs": ("", ",$answer"),
}
SCORED = {  # reward (and kwargs) -> the example it scores against
    "countdown": ({}, {"numbers": [3, 5, 2, 7], "target": 16}),
    "exact_int": ({}, {"answer": "12"}),
    "format/strict": ({"mode": "strict"}, {}),
    "format/soft": ({"mode": "soft"}, {}),
    "math_verify": ({}, {"answer": "12"}),
}
NOT_TEXT = {"length_penalty": "scores token lengths, not text", "reward_model": "needs a checkpoint"}


def adversarial(prefix: str, unit: str, chars: int) -> str:
    return prefix + (unit * (chars // len(unit) + 1))[: chars - len(prefix)]


def prose(chars: int) -> str:
    end = "So the sum is 12.\n<answer>\\boxed{12}</answer>"
    return adversarial("", "We add the numbers one by one and check each partial sum. ", chars - len(end)) + end


def seconds(fn, completion: str, example: dict, kwargs: dict, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _clear_math_verify_caches()
        start = time.perf_counter()
        fn("", completion, example, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def _clear_math_verify_caches() -> None:
    """math-verify memoises parsed expressions (lru_cache); clear them so every repeat pays the full parse."""
    parser = sys.modules.get("math_verify.parser")
    for name in ("parse_latex_cached", "parse_expr_cached"):
        getattr(getattr(parser, name, None), "cache_clear", lambda: None)()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=0.2, help="exit 1 if any cell takes this many seconds or more")
    args = parser.parse_args(argv)
    names = {name.split("/")[0] for name in SCORED}
    builtins = [n for n in registered_rewards() if get_reward(n).fn.__module__.startswith("grpo_jax.")]
    missing = [n for n in builtins if n not in names and n not in NOT_TEXT]
    if missing:
        raise SystemExit(f"benchmarks/verifiers.py: add an example to SCORED for the new reward(s) {missing}")
    table: dict[str, dict[str, float]] = {}
    for label, (kwargs, example) in SCORED.items():
        fn = get_reward(label.split("/")[0]).fn
        fn("", "warm up: <answer>\\boxed{1}</answer>", example, **kwargs)  # imports (sympy) and compiled regexes
        row = {"prose (anchor)": seconds(fn, prose(args.chars), example, kwargs, args.repeats)}
        for family in FAMILIES:
            row[family] = seconds(fn, adversarial(*FAMILIES[family], args.chars), example, kwargs, args.repeats)
        table[label] = row
    print(f"seconds to score one {args.chars:,}-character completion (fastest of {args.repeats}); limit {args.limit} s")
    print(f"{'family':20s}" + "".join(f"{label:>15s}" for label in table))
    for family in next(iter(table.values())):
        print(f"{family:20s}" + "".join(f"{row[family]:15.4f}" for row in table.values()))
    worst = {label: max(v for k, v in row.items() if k != "prose (anchor)") for label, row in table.items()}
    print(f"{'max':20s}" + "".join(f"{worst[label]:15.4f}" for label in table))
    print(f"{'max / anchor':20s}" + "".join(f"{worst[k] / table[k]['prose (anchor)']:15.1f}" for k in table))
    for name, why in NOT_TEXT.items():
        print(f"skipped {name}: {why}")
    report = {"benchmark": "verifiers", **perf.device_info(), "chars": args.chars, "repeats": args.repeats,
              "limit_s": args.limit, "max_s": worst, "seconds": table, "ok": max(worst.values()) < args.limit}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
