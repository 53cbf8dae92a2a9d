"""Rule-based verifiers: plain functions ``(prompt, completion, example, **kwargs) -> float``, and the answer
extraction they share.

Model output is never passed to ``eval``/``exec``: countdown and arithmetic expressions are parsed with ``ast`` and
evaluated by walking a whitelist of nodes (integer literals, binary + - * /, parentheses) with exact fractions.
"""
from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

# ---------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped; None when there is none.

    Blocks are read left to right as ``re.findall(r"<answer>(.*?)</answer>", text, re.S)`` reads them (from an
    ``<answer>`` to the first ``</answer>`` after it, then on from there), but by ``str.find``: linear time however
    many tags are left unclosed.
    """
    block, pos = None, 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        block, pos = (start + len("<answer>"), end), end + len("</answer>")
    return None if block is None else text[block[0] : block[1]].strip()


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), matching nested braces; None when absent/unclosed.

    One pass from that last opening brace: linear time.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (``1,234`` grouping allowed), as an exact Decimal."""
    found = _NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def _final_answer_text(completion: str) -> str:
    """What the completion offers as its answer: the <answer> block if any, else its last \\boxed{}, else all of it."""
    text = answer_tag(completion)
    text = completion if text is None else text
    boxed = last_boxed(text)
    return text if boxed is None else boxed


def answer_key(completion: str) -> str | None:
    """The completion's final answer in a canonical form, for majority voting (maj@k): the answer text (the
    <answer> block, else the last \\boxed{}, else the whole completion); its last number when it has one (``1,234``,
    ``1234.0`` and ``1234`` all give ``1234``), else the text with whitespace collapsed; None when it is empty."""
    text = _final_answer_text(completion)
    number = last_number(text)
    if number is not None:
        number += 0  # -0 -> 0
        return format(number.normalize() if number != number.to_integral_value() else number.to_integral_value(), "f")
    text = " ".join(text.split())
    return text or None


# ---------------------------------------------------------------- safe arithmetic

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_EXPRESSION_CHARS = 256


def parse_arithmetic(expr: str) -> ast.expr | None:
    """Parse ``expr`` into an AST made only of int literals, binary + - * / and parentheses; None otherwise.

    Anything else (names, calls, attributes, ``**``, unary ops, floats, over-long input) is rejected without being
    evaluated, so ``__import__('os')`` or ``9**9**9`` cost only a parse.
    """
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            continue
        if isinstance(node, ast.operator) and type(node) in _BINOPS:
            continue
        return None
    return tree


def eval_arithmetic(tree: ast.expr) -> Fraction | None:
    """Exact value of a tree from :func:`parse_arithmetic`; None on division by zero."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    left, right = eval_arithmetic(tree.left), eval_arithmetic(tree.right)
    if left is None or right is None or (isinstance(tree.op, ast.Div) and right == 0):
        return None
    return _BINOPS[type(tree.op)](left, right)


def arithmetic_literals(tree: ast.expr) -> list[int]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


# ---------------------------------------------------------------- rewards


MATH_VERIFY_MAX_CHARS = 300


def math_verify_input(completion: str) -> str | None:
    r"""The text handed to math-verify: at most ``MATH_VERIFY_MAX_CHARS`` characters, found in linear time.

    The answer is the ``<answer>`` block when present, else the whole completion. If it holds a closed ``\boxed{}``
    (or ``\fbox{}``), the last one is handed over alone as ``\boxed{content}`` (what math-verify would pick), or
    None when its content is longer than the cap; otherwise its last ``MATH_VERIFY_MAX_CHARS`` characters are, where
    a final answer written without a box is. The cap bounds math-verify's extraction regexes, which are quadratic
    to cubic in their input: on the 2-core development CPU the slowest inputs found (runs of ``final answer is =$``,
    ``\boxed{\(}``, ``,$answer``) take 0.05-0.08 s at 300 characters but 0.26-0.5 s at 750-800 characters.
    """
    text = answer_tag(completion)
    text = completion if text is None else text
    boxed = last_boxed(text)
    if boxed is None:
        return text[-MATH_VERIFY_MAX_CHARS:]
    return "\\boxed{" + boxed + "}" if len(boxed) <= MATH_VERIFY_MAX_CHARS else None


def math_verify(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    r"""1.0 if the completion's answer is mathematically equivalent to ``example['answer']`` (math-verify).

    The gold is parsed as ``\boxed{gold}`` unless it already carries ``$`` or ``\boxed``; the prediction is
    :func:`math_verify_input` (the last ``\boxed{}`` of the ``<answer>`` block or else of the completion, else the
    end of that text), and scores 0 when that is None. math-verify's own signal-based timeouts are off: the worker
    pool enforces the timeout.
    """
    from math_verify import parse, verify

    gold_text = str(example["answer"])
    if "$" not in gold_text and "\\boxed" not in gold_text:
        gold_text = "\\boxed{" + gold_text + "}"
    gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math_verify: could not parse the gold answer {example['answer']!r}")
    text = math_verify_input(completion)
    pred = [] if text is None else parse(text, parsing_timeout=None)
    return float(bool(pred) and verify(gold, pred, timeout_seconds=None))


def exact_int(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """1.0 if the last number of the completion's answer equals the integer ``example['answer']``.

    The answer is the <answer> block, else the last \\boxed{}, else the whole completion; ``1,234`` and ``12.0``
    are read as 1234 and 12.
    """
    gold = Decimal(str(example["answer"]).replace(",", "").strip())
    if gold != gold.to_integral_value():
        raise ValueError(f"exact_int: gold answer {example['answer']!r} is not an integer")
    pred = last_number(_final_answer_text(completion))
    return float(pred is not None and pred == gold)


def countdown(prompt: str, completion: str, example: Mapping[str, Any], *, use_all: bool = False) -> float:
    """1.0 if the answer is an expression over ``example['numbers']`` that equals ``example['target']``.

    Each given number may be used at most once (exactly once with ``use_all=True``); only integer literals,
    + - * / and parentheses are allowed, and division is exact. The expression is the <answer> block (else the
    last \\boxed{}); a trailing ``= <target>`` is ignored.
    """
    expr = answer_tag(completion)
    expr = last_boxed(completion) if expr is None else expr
    if expr is None:
        return 0.0
    tree = parse_arithmetic(expr.partition("=")[0])
    if tree is None:
        return 0.0
    used, given = Counter(arithmetic_literals(tree)), Counter(int(n) for n in example["numbers"])
    if used - given or (use_all and used != given):
        return 0.0
    return float(eval_arithmetic(tree) == int(example["target"]))


_TAGS = r"</?(?:think|answer)>"
_FREE = rf"(?:(?!{_TAGS}).)*?"  # any text that contains no think/answer tag
_STRICT = re.compile(rf"\A<think>\n{_FREE}\n</think>\n<answer>\n{_FREE}\n</answer>\n?\Z", re.S)
_THINK_END_ANSWER = re.compile(r"</think>\s*<answer>")


def _soft_format(text: str) -> bool:
    r"""Whether ``re.search(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.S)`` matches, in linear time.

    A match from any ``<think>`` implies one from the first (whose ``.*?`` can stretch further), and the earliest
    ``</think>\s*<answer>`` after it leaves the most room for a ``</answer>``: three forward scans.
    """
    start = text.find("<think>")
    if start < 0:
        return False
    bridge = _THINK_END_ANSWER.search(text, start + len("<think>"))
    return bridge is not None and text.find("</answer>", bridge.end()) >= 0


def format_reward(
    prompt: str, completion: str, example: Mapping[str, Any], *, mode: Literal["strict", "soft"] = "strict"
) -> float:
    """R1-style template ``<think>...</think><answer>...</answer>``.

    strict: the completion is exactly ``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>`` (one optional trailing
    newline), with no other think/answer tag inside. soft: a think block followed, after optional whitespace, by an
    answer block appears anywhere in the completion. Both take linear time (the strict pattern is anchored, and its
    tag-free spans cannot run past the next tag, so it never backtracks far).
    """
    if mode not in ("strict", "soft"):
        raise ValueError(f"format: mode must be 'strict' or 'soft', got {mode!r}")
    return float(_STRICT.match(completion) is not None if mode == "strict" else _soft_format(completion))
