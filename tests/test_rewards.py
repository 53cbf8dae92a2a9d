"""Verifiers, the length penalty, the registry and compute_rewards (in-process rewards only), by hand."""
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from grpo_jax.advantages import AdvantageConfig, compute_advantages
from grpo_jax.rewards import (
    OverlongConfig,
    RewardsConfig,
    RewardSpec,
    answer_tag,
    compute_rewards,
    countdown,
    exact_int,
    format_reward,
    get_reward,
    last_boxed,
    length_penalty,
    math_verify,
    register_reward,
    resolve_rewards,
)


def test_math_verify_equivalence():
    half = {"answer": "0.5"}
    assert math_verify("", r"so the answer is \boxed{\frac{1}{2}}", half) == 1.0
    assert math_verify("", r"\boxed{\frac{1}{3}}", half) == 0.0
    assert math_verify("", "I have no idea", half) == 0.0
    # LaTeX gold without delimiters; the <answer> block wins over earlier numbers in the reasoning.
    assert math_verify("", r"\boxed{\dfrac{\sqrt3}{2}}", {"answer": r"\frac{\sqrt{3}}{2}"}) == 1.0
    assert math_verify("", "<think>is it 4?</think><answer>3</answer>", {"answer": "3"}) == 1.0
    assert math_verify("", "<think>is it 3?</think><answer>4</answer>", {"answer": "3"}) == 0.0


def test_exact_int():
    assert exact_int("", "5 + 7 = 12, so the answer is 12.", {"answer": "12"}) == 1.0
    assert exact_int("", "<answer>1,234</answer> (not 5)", {"answer": "1234"}) == 1.0
    assert exact_int("", r"\boxed{-3} and then 7", {"answer": "-3"}) == 1.0
    assert exact_int("", "12.0", {"answer": "12"}) == 1.0
    assert exact_int("", "12.5", {"answer": "12"}) == 0.0
    assert exact_int("", "no number", {"answer": "12"}) == 0.0
    with pytest.raises(ValueError, match="not an integer"):
        exact_int("", "1", {"answer": "1.5"})


CD = {"numbers": [3, 5, 2, 7], "target": 16}


def test_countdown_accepts_valid_and_exact_division():
    assert countdown("", "<answer>(3 + 5) * 2</answer>", CD) == 1.0  # 8 * 2 = 16, 7 unused (at most once)
    assert countdown("", "<answer>(3 + 5) * 2 = 16</answer>", CD) == 1.0  # trailing "= target" ignored
    assert countdown("", "<answer>7 * 2 + 5 - 3</answer>", CD) == 1.0  # 14 + 5 - 3 = 16
    assert countdown("", "<answer>(3 + 5) * 2</answer>", CD, use_all=True) == 0.0  # 7 unused
    # 3.5*8-12
    assert countdown("", r"\boxed{7 / 2 * (3 + 5) - 12}", {"numbers": [7, 2, 3, 5, 12], "target": 16}) == 1.0
    assert countdown("", "<answer>(3 + 5) * 2 + 7</answer>", CD) == 0.0  # = 23, wrong target
    assert countdown("", "<answer>5 / (3 - 3)</answer>", {"numbers": [5, 3, 3], "target": 1}) == 0.0  # div by 0


def test_countdown_rejects_reuse_and_foreign_numbers():
    assert countdown("", "<answer>(3 + 3) * 2 + 5 - 1</answer>", CD) == 0.0  # 3 used twice
    assert countdown("", "<answer>8 * 2</answer>", CD) == 0.0  # 8 is not given
    assert countdown("", "(3 + 5) * 2", CD) == 0.0  # no <answer>/boxed block


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('touch {p}')",
        "open('{p}', 'w')",
        "(3).__class__",
        "[c for c in ().__class__.__base__.__subclasses__()]",
        "9 ** 9 ** 9 ** 9",
        "-3 + 19",  # unary minus is not a binary + - * /
        "16.0",
        "lambda: 16",
    ],
)
def test_countdown_rejects_non_whitelisted_syntax_without_running_it(expr, tmp_path: Path):
    sentinel = tmp_path / "pwned"
    ex = {"numbers": [3, 9, 19, 16], "target": 16}
    assert countdown("", f"<answer>{expr.format(p=sentinel)}</answer>", ex) == 0.0
    assert not sentinel.exists()


def test_format_strict_and_soft():
    good = "<think>\nadd them\n</think>\n<answer>\n12\n</answer>"
    cases = {  # completion -> (strict, soft)
        good: (1.0, 1.0),
        good + "\n": (1.0, 1.0),
        "<think>add them</think><answer>12</answer>": (0.0, 1.0),  # no newlines: soft only
        "Sure! " + good: (0.0, 1.0),  # text before the template
        good + "\n<answer>\n13\n</answer>": (0.0, 1.0),  # a second answer block
        "<think>\nx\n<think>\ny\n</think>\n<answer>\n1\n</answer>": (0.0, 1.0),  # nested think tag
        "<answer>\n12\n</answer>\n<think>\nx\n</think>": (0.0, 0.0),  # wrong order
        "<think>\nonly thinking\n</think>": (0.0, 0.0),
    }
    for completion, (strict, soft) in cases.items():
        assert format_reward("", completion, {}, mode="strict") == strict, completion
        assert format_reward("", completion, {}, mode="soft") == soft, completion


def test_extraction_helpers():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\text{(C)}}") == r"\text{(C)}"
    assert last_boxed(r"\boxed{1 + {2") is None
    assert answer_tag("<answer> 1 </answer> x <answer>\n2\n</answer>") == "2"
    assert answer_tag("none") is None


def test_length_penalty_kimi_formula():
    # lengths 10, 20, 30, 50: min 10, max 50 -> λ = 0.5 - (len - 10)/40 = 0.5, 0.25, 0.0, -0.5
    lengths, correct = np.array([10, 20, 30, 50]), np.array([True, False, True, False])
    # correct keep λ; incorrect get min(0, λ): 0.5, min(0, .25)=0, 0.0, -0.5
    np.testing.assert_allclose(length_penalty(lengths, correct), [0.5, 0.0, 0.0, -0.5])
    # reference="correct": min/max over correct lengths 10, 30 -> λ = 0.5 - (len - 10)/20 clipped to ±0.5
    #   = 0.5, 0.0, -0.5, clip(-1.5) = -0.5; incorrect -> min(0, λ)
    np.testing.assert_allclose(length_penalty(lengths, correct, reference="correct"), [0.5, 0.0, -0.5, -0.5])
    np.testing.assert_array_equal(length_penalty(np.array([7, 7]), np.array([True, False])), [0.0, 0.0])
    np.testing.assert_array_equal(length_penalty(lengths, np.zeros(4, bool), reference="correct"), np.zeros(4))


def test_registry_errors_and_custom_rewards():
    with pytest.raises(ValueError, match=r"unknown reward 'mathverify'; registered: countdown, exact_int, format"):
        get_reward("mathverify")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("no_such_module_xyz:fn")
    assert get_reward("grpo_jax.rewards.verifiers:exact_int").fn is exact_int
    assert get_reward(exact_int).isolated  # a user callable may hang: isolated
    with pytest.raises(ValueError, match="kwargs.*do not fit"):
        resolve_rewards(RewardsConfig(fns=(RewardSpec(name="format", kwargs={"strictness": 1}),)))
    with pytest.raises(ValueError, match="correct_from must name a sample reward"):
        resolve_rewards(RewardsConfig(fns=(RewardSpec(name="length_penalty", kwargs={"correct_from": "x"}),)))
    with pytest.raises(ValueError, match=r"repeated: \['format'\]"):
        RewardsConfig(fns=(RewardSpec(name="format"), RewardSpec(name="format", kwargs={"mode": "soft"})))
    with pytest.raises(ValueError, match="OverlongConfig.buffer"):
        OverlongConfig(max_len=10, buffer=11)


def test_compute_rewards_weights_group_term_and_overlong():
    cfg = RewardsConfig(
        fns=(
            RewardSpec(name="exact_int", weight=1.0),
            RewardSpec(name="format", weight=0.5, kwargs={"mode": "soft"}),
            RewardSpec(name="length_penalty", weight=0.2, kwargs={"correct_from": "exact_int"}),
        ),
        overlong=OverlongConfig(max_len=100, buffer=20),
    )
    completions = ["<think>x</think><answer>4</answer>", "<answer>5</answer>", "4", "5"]
    examples = [{"answer": "4"}] * 2 + [{"answer": "5"}] * 2
    lengths = np.array([10, 90, 40, 40])
    total, m = compute_rewards(cfg, ["p"] * 4, completions, examples, group_size=2, lengths_B=lengths)
    # group 1: exact 1, 0; format 1, 0; lengths 10, 90 -> λ = 0.5, -0.5 -> length 0.5, min(0,-0.5) = -0.5
    #          overlong: start 80; 90 -> -(10/20) = -0.5
    # group 2: exact 0, 1; format 0, 0; equal lengths -> 0; no overlong
    expected = [1 + 0.5 + 0.2 * 0.5, 0.2 * -0.5 - 0.5, 0.0, 1.0]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert total.dtype == np.float32
    assert m["reward/exact_int/mean"] == 0.5 and m["reward/format/mean"] == 0.25
    assert m["reward/length_penalty/mean"] == 0.0 and m["reward/overlong/mean"] == -0.125
    assert m["reward/exact_int/errors"] == 0 and m["reward/zero_variance_fraction"] == 0.0


def _returns_none(prompt, completion, example):
    return None if example["bad"] else 1.0


def _returns_nan(prompt, completion, example):
    return math.nan if example["bad"] else 0.0


def _returns_text(prompt, completion, example):
    return "1.0" if example["bad"] else 0.0


def _raises_once_kind(prompt, completion, example):
    if example["bad"]:
        raise KeyError("missing field")
    return 1.0


for _fn in (_returns_none, _returns_nan, _returns_text, _raises_once_kind):
    register_reward(f"test{_fn.__name__}", _fn, isolated=False)


def test_invalid_values_score_zero_counted_and_advantages_stay_finite(caplog):
    cfg = RewardsConfig(fns=tuple(RewardSpec(name=f"test{f.__name__}")
                                  for f in (_returns_none, _returns_nan, _returns_text)))
    # group 1: every reward returns None/NaN/"1.0" for every sample -> all 0; group 2: sample 0 is bad
    examples = [{"bad": True}] * 3 + [{"bad": True}, {"bad": False}, {"bad": False}]
    total, m = compute_rewards(cfg, ["p"] * 6, ["c"] * 6, examples, group_size=3)
    np.testing.assert_array_equal(total, [0, 0, 0, 0, 1, 1])  # _returns_none gives 1.0 when good
    assert m["reward/test_returns_none/invalid"] == 4 and m["reward/test_returns_nan/invalid"] == 4
    assert m["reward/test_returns_text/invalid"] == 4 and m["reward/test_returns_none/errors"] == 0
    assert m["reward/zero_variance_fraction"] == 0.5  # group 1 all equal, group 2 not
    adv = np.asarray(compute_advantages(total, 3, AdvantageConfig()))
    assert np.isfinite(adv).all() and (adv[:3] == 0).all()

    cfg = RewardsConfig(fns=(RewardSpec(name="test_raises_once_kind"),))
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.combine"):
        for _ in range(2):
            total, m = compute_rewards(cfg, ["p"] * 2, ["c"] * 2, [{"bad": True}, {"bad": False}], group_size=2)
            np.testing.assert_array_equal(total, [0.0, 1.0])
            assert m["reward/test_raises_once_kind/errors"] == 1
    logged = [r for r in caplog.records if "test_raises_once_kind" in r.getMessage()]
    assert len(logged) == 1 and "KeyError: 'missing field'" in logged[0].getMessage()


def test_rewards_config_loads_from_a_yaml_like_dict():
    from grpo_jax.config import ConfigError, from_dict

    raw = {"fns": [{"name": "exact_int"}, {"name": "format", "weight": 0.1, "kwargs": {"mode": "soft"}}],
           "overlong": {"max_len": 512, "buffer": 64}}
    cfg = from_dict(RewardsConfig, raw)
    assert cfg.fns[1] == RewardSpec(name="format", weight=0.1, kwargs={"mode": "soft"})
    assert cfg.overlong == OverlongConfig(max_len=512, buffer=64) and cfg.timeout_s == 5.0
    with pytest.raises(ConfigError, match="timeout_s must be a finite number of seconds > 0"):
        from_dict(RewardsConfig, {**raw, "timeout_s": 0})
