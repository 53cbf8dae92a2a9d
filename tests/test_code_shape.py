"""The shape STYLE.md asks of the package: files of at most 300 lines, functions of at most 60, a training loop that
fits on one screen, and a loop and train step that never test the algorithm's kind."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "grpo_jax"
FILES = sorted(PACKAGE.rglob("*.py"))


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_file_over_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in FILES if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_no_function_over_60_lines_and_train_fits_on_a_screen():
    long = [(str(p.relative_to(PACKAGE)), name, n) for p in FILES for name, n in functions(p) if n > 60]
    assert not long, long
    assert dict(functions(PACKAGE / "loop.py"))["train"] <= 40


def test_loop_and_train_step_know_no_algorithm_by_name():
    pattern = re.compile(r'kind ?(==|!=|in)|"(ppo|dpo|hybrid|reinforce_pp)"')
    hits = [f"{name}:{i}: {line.strip()}" for name in ("loop.py", "sampling.py", "train_step.py")
            for i, line in enumerate((PACKAGE / name).read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
