"""The linear-time verifiers: the same answers as the regexes they replaced, and correct scores on 200,000-character
adversarial completions (their speed is measured by benchmarks/verifiers.py, never asserted here)."""
import importlib.util
import random
import re
from pathlib import Path

from grpo_jax.rewards import answer_tag, countdown, exact_int, format_reward, last_boxed, math_verify
from grpo_jax.rewards.verifiers import MATH_VERIFY_MAX_CHARS, math_verify_input

N = 200_000
OLD_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)  # the regexes the scans replaced: the oracles
OLD_SOFT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)


def old_answer_tag(text):
    found = OLD_ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def random_texts(tokens, count, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(tokens) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def test_answer_tag_reads_blocks_as_findall_did():
    cases = {
        "<answer>a<answer>b</answer>c</answer>": "a<answer>b",  # from the first <answer> to the first </answer>
        "<answer>1</answer> <answer>2": "1",  # an unclosed last block does not count
        "</answer><answer> x </answer>": "x",
        "<answer></answer>": "",
        "<answer><answer></answer>": "<answer>",
        "<answer></answer></answer>": "",
    }
    for text, want in cases.items():
        assert answer_tag(text) == want == old_answer_tag(text), text
    tokens = ["<answer>", "</answer>", "<answer></answer>", "a", " ", "\n", "<answer", "answer>", "</"]
    for text in random_texts(tokens, 3000, seed=0):
        assert answer_tag(text) == old_answer_tag(text), text


def test_soft_format_matches_the_old_regex():
    cases = {  # completion -> soft score
        "<think></think><answer></answer>": 1.0,
        "<think>a</think> \n\t <answer>b</answer>": 1.0,  # any whitespace between the blocks
        "<think>a</think>x<answer>b</answer>": 0.0,
        "<think><think></think><answer></answer>": 1.0,  # a match from the second <think> counts
        "<think>a</think>x</think>\n<answer>b</answer>": 1.0,  # a later </think> can be the one
        "<think>a</think><answer>b": 0.0,
        "<answer></answer><think></think>": 0.0,
        "<think></think>\u2003<answer></answer>": 1.0,  # \s is Unicode whitespace, as in the regex
    }
    for text, want in cases.items():
        assert format_reward("", text, {}, mode="soft") == want == float(OLD_SOFT.search(text) is not None), text
    tokens = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "\u2003", "</think><answer>"]
    for text in random_texts(tokens, 3000, seed=1):
        assert format_reward("", text, {}, mode="soft") == float(OLD_SOFT.search(text) is not None), text


def test_last_boxed_edge_cases():
    assert last_boxed(r"\boxed{1} \fbox{2}") == "2" and last_boxed(r"\fbox{1} \boxed{{2}}") == "{2}"
    assert last_boxed(r"\boxed{1} \boxed{2") is None  # the last one is unclosed
    assert last_boxed(r"\boxed{a}b}") == "a" and last_boxed("no box {}") is None


def test_math_verify_input_is_bounded():
    cap = MATH_VERIFY_MAX_CHARS
    assert cap == 300
    assert math_verify_input(r"x \boxed{1} then \boxed{\frac{1}{2}} done") == r"\boxed{\frac{1}{2}}"
    assert math_verify_input(r"<answer>so \fbox{3}</answer> \boxed{4}") == r"\boxed{3}"  # the answer block's box
    assert math_verify_input("<answer> 7 </answer>") == "7"
    long = "w" * N + " the answer is 12"
    assert math_verify_input(long) == long[-cap:] and len(math_verify_input(long)) == cap
    assert math_verify_input(r"\boxed{" + "1" * cap + "}") == r"\boxed{" + "1" * cap + "}"
    assert math_verify_input(r"\boxed{" + "1" * (cap + 1) + "}") is None  # a longer answer scores 0


def repeat(unit, chars=N):
    """Whole copies of ``unit``, about ``chars`` characters."""
    return unit * (chars // len(unit))


CD = {"numbers": [3, 5, 2, 7], "target": 16}


def test_adversarial_completions_get_the_right_score():
    twelve = {"answer": "12"}
    # exact_int: no closed <answer> block and no \boxed, so the whole text's last number counts
    assert exact_int("", repeat("<answer>") + " 12", twelve) == 1.0
    assert exact_int("", repeat("1,") + "12", twelve) == 1.0  # ",12" is no thousands group: the last number is 12
    assert exact_int("", repeat("123,"), {"answer": "123"}) == 0.0  # 123,123,...: one huge grouped number
    assert exact_int("", repeat("\\boxed{") + "12}", twelve) == 1.0
    assert exact_int("", repeat("7"), twelve) == 0.0
    assert exact_int("", repeat("{") + "<answer>12</answer>", twelve) == 1.0
    # countdown: the block runs from the first <answer> to the first </answer>, so stray tags before spoil it
    assert countdown("", repeat("<answer>"), CD) == 0.0
    assert countdown("", repeat("</answer>") + "<answer>(3 + 5) * 2</answer>", CD) == 1.0
    assert countdown("", repeat("\\boxed{") + "(3 + 5) * 2}", CD) == 1.0
    assert countdown("", "<answer>" + repeat("(") + "</answer>", CD) == 0.0  # past the 256-char cap: not parsed
    # format
    good = "<think>\n" + repeat("a\n") + "\n</think>\n<answer>\n12\n</answer>"
    assert format_reward("", good, {}, mode="strict") == 1.0
    assert format_reward("", good + "\n\n", {}, mode="strict") == 0.0
    assert format_reward("", "<think>\n" + repeat("<think>\n"), {}, mode="strict") == 0.0
    assert format_reward("", repeat("<think>"), {}, mode="soft") == 0.0
    assert format_reward("", repeat("<think>") + "</think><answer>1</answer>", {}, mode="soft") == 1.0
    assert format_reward("", "<think>" + repeat("</think>   "), {}, mode="soft") == 0.0
    assert format_reward("", "<think>" + repeat("</think>\n<answer>"), {}, mode="soft") == 0.0


def test_math_verify_on_adversarial_completions():
    twelve = {"answer": "12"}
    assert math_verify("", repeat("\\boxed{") + "\\boxed{12}", twelve) == 1.0
    assert math_verify("", repeat("\\boxed{\\[}") + "\\boxed{12}", twelve) == 1.0
    assert math_verify("", repeat("{") + "so the answer is $12$", twelve) == 1.0  # the end of an unboxed answer
    assert math_verify("", repeat("7 ") + "12", twelve) == 1.0
    assert math_verify("", "\\boxed{" + repeat("1") + "}", twelve) == 0.0  # a 200,000-digit answer: not parsed
    assert math_verify("", repeat("<answer>"), twelve) == 0.0


def test_benchmark_script_runs_small(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "verifiers.py"
    spec = importlib.util.spec_from_file_location("bench_verifiers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--chars", "2000", "--repeats", "1"])
    assert set(report["max_s"]) == {"countdown", "exact_int", "format/strict", "format/soft", "math_verify"}
    assert all(set(row) == {"prose (anchor)", *module.FAMILIES} for row in report["seconds"].values())
    assert "skipped reward_model" in capsys.readouterr().out
