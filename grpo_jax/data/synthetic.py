"""Synthetic, seeded tasks with difficulty levels 1-4: integer arithmetic and Countdown.

Both use ``random.Random(seed)`` (stable across Python versions) and compute answers with the same safe
evaluator the rewards use, so a generated answer is exactly what the verifier accepts.
"""
from __future__ import annotations

import random

from grpo_jax.rewards.verifiers import eval_arithmetic, parse_arithmetic

# difficulty -> (number of operands, max digits per operand)
ARITH_LEVELS = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (4, 3)}
# difficulty -> how many numbers are given; targets lie in [1, COUNTDOWN_MAX_TARGET]
COUNTDOWN_LEVELS = {1: 3, 2: 4, 3: 5, 4: 6}
COUNTDOWN_MAX_NUMBER = 99
COUNTDOWN_MAX_TARGET = 100


def arith_examples(
    num_examples: int, difficulty: int, seed: int, ops: str = "+-*", digits: tuple[int, ...] = ()
) -> list[dict]:
    """``a op b op c ...`` with operators drawn from ``ops`` (a subset of ``+-*``, usual precedence); the answer is
    the exact integer value. ``digits`` (max digits of each operand, e.g. (2, 1) for ``47 + 8``) overrides the
    operand count and sizes of ``difficulty``.

    Example fields: question, answer (str), expression, units_slip_answer (the answer with its units digit one too
    high, 9 wrapping to 0: 47 + 38 -> 86, 41 + 48 -> 80) and, for pure additions, no_carry_answer (carries dropped:
    47 + 38 -> 75). The two slips are systematic errors for warm-start data with a known flaw.
    """
    if not digits:
        operands, size = _level(ARITH_LEVELS, difficulty, "arith")
        digits = (size,) * operands
    rng = random.Random(seed)
    examples = []
    for _ in range(num_examples):
        terms = [str(rng.randint(1, 10**d - 1)) for d in digits]
        chosen = [rng.choice(ops) for _ in range(len(digits) - 1)]
        expression = terms[0] + "".join(f" {op} {t}" for op, t in zip(chosen, terms[1:]))
        value = eval_arithmetic(parse_arithmetic(expression))
        answer = str(int(value))
        example = {"question": f"What is {expression}?", "answer": answer, "expression": expression,
                   "units_slip_answer": _units_slip(answer)}
        if set(chosen) == {"+"}:
            example["no_carry_answer"] = _no_carry_sum(terms)
        examples.append(example)
    return examples


def _units_slip(answer: str) -> str:
    """The units digit one too high, 9 wrapping to 0 without a carry: 85 -> 86, 89 -> 80, -12 -> -13."""
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def _no_carry_sum(terms: list[str]) -> str:
    """The classic addition slip: each digit column summed mod 10, carries dropped (47 + 38 -> 75)."""
    width = max(map(len, terms))
    columns = zip(*(t.zfill(width) for t in terms))
    return str(int("".join(str(sum(map(int, col)) % 10) for col in columns)))


def countdown_examples(num_examples: int, difficulty: int, seed: int) -> list[dict]:
    """Numbers in [1, 99] and a target in [1, 100] reachable by using every number once with + - * /.

    A random expression tree over the numbers is built first (subtraction kept positive, division exact) and its
    value becomes the target, so a solution always exists. Example fields: question, answer (the target as str),
    numbers, target, solution (one valid expression).
    """
    count = _level(COUNTDOWN_LEVELS, difficulty, "countdown")
    rng = random.Random(seed)
    examples = []
    while len(examples) < num_examples:
        numbers = [rng.randint(1, COUNTDOWN_MAX_NUMBER) for _ in range(count)]
        solution, target = _random_solution(numbers, rng)
        if not 1 <= target <= COUNTDOWN_MAX_TARGET:
            continue
        rng.shuffle(numbers)
        question = (
            f"Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, *, / and "
            "parentheses, and each number at most once."
        )
        examples.append(
            {"question": question, "answer": str(target), "numbers": numbers, "target": target, "solution": solution}
        )
    return examples


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[str, int]:
    """Combine random pairs until one value is left; returns (expression, value)."""
    items = [(str(n), n) for n in numbers]
    while len(items) > 1:
        (ea, a), (eb, b) = (items.pop(rng.randrange(len(items))) for _ in range(2))
        if a < b:
            (ea, a), (eb, b) = (eb, b), (ea, a)
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if a % b == 0 else [])
        op = rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        items.append((f"({ea} {op} {eb})", value))
    expression, value = items[0]
    return expression[1:-1] if expression.startswith("(") else expression, value


def _level(table: dict, difficulty: int, task: str):
    if difficulty not in table:
        raise ValueError(f"{task}: difficulty must be one of {sorted(table)}, got {difficulty}")
    return table[difficulty]
