"""Data configuration: which task, where its rows come from, how they are split, templated and ordered."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal, get_args

Task = Literal["arith", "countdown", "gsm8k", "math"]
SYNTHETIC_TASKS = ("arith", "countdown")
DIFFICULTY_LEVELS = (1, 2, 3, 4)

# Hub tasks: our field -> the dataset's column, as laid out on the hub (openai/gsm8k; hendrycks MATH and its
# copies; MATH-500 adds an `answer` column). `DataConfig.columns` overrides entries. Fields in OPTIONAL_COLUMNS
# are used when the column exists and required only when `columns` names them.
HUB_COLUMNS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "answer": "answer"},
    "math": {"question": "problem", "solution": "solution", "answer": "answer"},
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"gsm8k": (), "math": ("answer",)}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where prompts come from.

    task: ``arith`` / ``countdown`` (synthetic, seeded, ``difficulty`` 1-4, ``num_examples`` generated) or
      ``gsm8k`` / ``math`` (rows from ``source``).
    levels: synthetic tasks only: a mix of difficulty levels instead of ``difficulty`` (e.g. ``[1, 2, 3]``),
      ``num_examples`` split equally (the first levels take the remainder), level k generated from seed
      ``seed + 1000·k``. Every synthetic example carries its ``level``; the loop reports accuracy per level.
    source: a hub dataset name (``openai/gsm8k``, with ``subset='main'``), or local ``.jsonl``/``.json``/
      ``.parquet``/``.arrow``/``.csv`` file(s) (a glob is allowed; ``split`` is then ignored).
    columns: ``{our_field: their_column}`` overriding ``HUB_COLUMNS[task]``, e.g. ``{"question": "prompt"}``.
    held_out_fraction: share of the rows set aside for evaluation, chosen from ``seed``; or ``held_out_source``
      (+ ``held_out_split``) loads the evaluation rows separately. Held-out questions are removed from train.
    template: a format string over the example's fields (``{question}``; task fields such as arith's
      ``{expression}``), wrapped as the user turn of the tokenizer's chat template when it has one (with
      ``system_prompt`` as the system turn), else used as the raw prompt.
    seed: drives generation, the held-out split and the epoch shuffles.
    """

    task: Task
    source: str | None = None
    subset: str | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    held_out_fraction: float = 0.0
    held_out_source: str | None = None
    held_out_split: str = "test"
    num_examples: int = 10_000
    difficulty: int = 1
    levels: tuple[int, ...] = ()
    ops: str = "+-*"  # arith only: the operators drawn from
    digits: tuple[int, ...] = ()  # arith only: max digits per operand, overriding difficulty (e.g. [2, 1])
    seed: int = 0
    system_prompt: str | None = None
    template: str = "{question}"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.task not in get_args(Task):
            raise ValueError(f"DataConfig.task must be one of {list(get_args(Task))}, got {self.task!r}")
        synthetic = self.task in SYNTHETIC_TASKS
        if synthetic and (self.source or self.held_out_source or self.columns):
            raise ValueError(
                f"DataConfig: task {self.task!r} is synthetic; source, held_out_source and columns must be unset"
            )
        if not synthetic and not self.source:
            raise ValueError(f"DataConfig.source is required for task {self.task!r} (a hub name or local file path)")
        if not synthetic and (unknown := sorted(set(self.columns) - set(HUB_COLUMNS[self.task]))):
            raise ValueError(
                f"DataConfig.columns: unknown field(s) {unknown} for {self.task!r}; "
                f"fields: {sorted(HUB_COLUMNS[self.task])}"
            )
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"DataConfig.held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.held_out_fraction > 0 and self.held_out_source:
            raise ValueError("DataConfig: set held_out_fraction or held_out_source, not both")
        if not self.ops or set(self.ops) - set("+-*") or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"DataConfig.ops must be distinct characters from '+-*', got {self.ops!r}")
        if self.ops != "+-*" and self.task != "arith":
            raise ValueError(f"DataConfig.ops applies to task 'arith' only, not {self.task!r}")
        if self.digits and (self.task != "arith" or len(self.digits) < 2 or not all(1 <= d <= 9 for d in self.digits)):
            raise ValueError(
                f"DataConfig.digits applies to task 'arith': >= 2 operands of 1-9 digits, got {self.digits}")
        if self.num_examples < 1:
            raise ValueError(f"DataConfig.num_examples must be >= 1, got {self.num_examples}")
        if self.difficulty not in DIFFICULTY_LEVELS:
            raise ValueError(f"DataConfig.difficulty must be one of {list(DIFFICULTY_LEVELS)}, got {self.difficulty}")
        if self.levels and (not synthetic or len(set(self.levels)) != len(self.levels)
                            or set(self.levels) - set(DIFFICULTY_LEVELS)):
            raise ValueError(f"DataConfig.levels applies to synthetic tasks {list(SYNTHETIC_TASKS)}: "
                             f"distinct levels from {list(DIFFICULTY_LEVELS)}, got {list(self.levels)} "
                             f"for task {self.task!r}")
        if self.levels and self.digits:
            raise ValueError("DataConfig: set levels or digits, not both (digits fixes one operand layout)")
        if self.levels and self.num_examples < len(self.levels):
            raise ValueError(f"DataConfig.num_examples={self.num_examples} is fewer than the {len(self.levels)} levels")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as e:
            raise ValueError(f"DataConfig.template is not a valid format string ({e}): {self.template!r}") from e
        if not fields or "" in fields or any(not f.isidentifier() for f in fields):
            raise ValueError(
                f"DataConfig.template must use named example fields such as {{question}}, got {sorted(fields)}")
