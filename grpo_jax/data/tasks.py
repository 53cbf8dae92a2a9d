"""Named task builders and the train / held-out split.

A builder maps ``(cfg, source, split)`` to examples: dicts with at least ``question`` and ``answer`` (the gold
answer as text) plus the task's fields (countdown: ``numbers``, ``target``). ``build_splits`` adds the rendered
``prompt`` to each example. The natural rewards: arith -> ``exact_int``, countdown -> ``countdown``,
gsm8k -> ``exact_int`` or ``math_verify``, math -> ``math_verify``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from grpo_jax.data.config import HUB_COLUMNS, OPTIONAL_COLUMNS, DataConfig
from grpo_jax.data.loading import load_rows, select_columns
from grpo_jax.data.synthetic import arith_examples, countdown_examples
from grpo_jax.data.templating import render_prompt
from grpo_jax.rewards.verifiers import last_boxed

TaskBuilder = Callable[[DataConfig, str | None, str], list[dict]]
_TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def add(builder: TaskBuilder) -> TaskBuilder:
        _TASKS[name] = builder
        return builder

    return add


def get_task(name: str) -> TaskBuilder:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def _levelled(cfg: DataConfig, make: Callable[[int, int, int], list[dict]]) -> list[dict]:
    """``make(num_examples, difficulty, seed)`` for ``cfg.difficulty``, or for each of ``cfg.levels`` (an equal share
    each, seed + 1000·level, interleaved level by level); every example gets its ``level``."""
    if not cfg.levels:
        return [{**ex, "level": cfg.difficulty} for ex in make(cfg.num_examples, cfg.difficulty, cfg.seed)]
    share, extra = divmod(cfg.num_examples, len(cfg.levels))
    made = [make(share + (i < extra), level, cfg.seed + 1000 * level) for i, level in enumerate(cfg.levels)]
    return [{**made[i][j], "level": level} for j in range(share + 1) for i, level in enumerate(cfg.levels)
            if j < len(made[i])]


@register_task("arith")
def arith_task(cfg: DataConfig, source: str | None, split: str) -> list[dict]:
    return _levelled(cfg, lambda n, level, seed: arith_examples(n, level, seed, cfg.ops, cfg.digits))


@register_task("countdown")
def countdown_task(cfg: DataConfig, source: str | None, split: str) -> list[dict]:
    return _levelled(cfg, countdown_examples)


def _hub_rows(cfg: DataConfig, source: str, split: str) -> list[dict]:
    rows = load_rows(source, split=split, subset=cfg.subset, cache_dir=cfg.cache_dir)
    columns = {**HUB_COLUMNS[cfg.task], **cfg.columns}
    what = f"{cfg.task} data {source!r}"
    return select_columns(rows, columns, optional=OPTIONAL_COLUMNS[cfg.task], required_override=tuple(cfg.columns),
                          what=what)


@register_task("gsm8k")
def gsm8k_task(cfg: DataConfig, source: str | None, split: str) -> list[dict]:
    """Columns question/answer; the gold answer is what follows ``####`` in the answer (commas removed)."""
    examples = []
    for i, row in enumerate(_hub_rows(cfg, source, split)):
        solution = str(row["answer"])
        if "####" not in solution:
            raise ValueError(
                f"gsm8k data {source!r}: row {i} has no '#### <answer>' in its answer column: {solution[-80:]!r}")
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
        examples.append({"question": row["question"], "answer": gold, "solution": solution})
    return examples


@register_task("math")
def math_task(cfg: DataConfig, source: str | None, split: str) -> list[dict]:
    r"""Columns problem/solution; gold = the ``answer`` column when present (MATH-500), else the solution's last
    ``\boxed{}`` (balanced braces)."""
    examples = []
    for i, row in enumerate(_hub_rows(cfg, source, split)):
        gold = row["answer"] if "answer" in row else last_boxed(str(row["solution"]))
        if gold is None or not str(gold).strip():
            raise ValueError(
                f"math data {source!r}: row {i} has no answer column value and no \\boxed{{}} in its solution")
        examples.append({"question": row["question"], "answer": str(gold).strip(), "solution": row["solution"]})
    return examples


@dataclass(frozen=True)
class Splits:
    train: list[dict]
    held_out: list[dict]


def build_splits(cfg: DataConfig, tokenizer=None) -> Splits:
    """Train and held-out examples, each with its rendered ``prompt``; deterministic in ``cfg``.

    With ``held_out_fraction`` the held-out rows are a seeded random subset; with ``held_out_source`` they are
    loaded from it. Either way, train examples whose question also appears held out are dropped.
    """
    builder = get_task(cfg.task)
    train = builder(cfg, cfg.source, cfg.split)
    held_out: list[dict] = []
    if cfg.held_out_source:
        held_out = builder(cfg, cfg.held_out_source, cfg.held_out_split)
    elif cfg.held_out_fraction > 0:
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        chosen = set(order[: max(1, round(cfg.held_out_fraction * len(train)))].tolist())
        held_out = [ex for i, ex in enumerate(train) if i in chosen]
        train = [ex for i, ex in enumerate(train) if i not in chosen]
    held_questions = {ex["question"] for ex in held_out}
    train = [ex for ex in train if ex["question"] not in held_questions]
    if not train:
        raise ValueError(f"data: no training examples left for task {cfg.task!r} after the held-out split")
    for ex in train + held_out:
        try:
            user = cfg.template.format(**ex)
        except KeyError as e:
            raise ValueError(
                f"DataConfig.template uses field {e} that {cfg.task!r} examples lack; fields: {sorted(ex)}") from None
        ex["prompt"] = render_prompt(tokenizer, user, system_prompt=cfg.system_prompt)
    return Splits(train=train, held_out=held_out)
