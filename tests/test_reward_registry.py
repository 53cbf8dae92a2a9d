"""The reward registry: one table of built-ins, no import of it from the reward modules, added rewards, and
rewards resolved once per run (``terms=``)."""
import ast
from pathlib import Path

import numpy as np
import pytest

import grpo_jax.rewards
from grpo_jax.rewards import (
    RewardsConfig,
    RewardSpec,
    combine,
    compute_rewards,
    length_penalty,
    math_verify,
    register_reward,
    resolve_rewards,
    reward_model,
    reward_table,
)
from grpo_jax.rewards.registry import BUILTIN_REWARDS, get_reward, registered_rewards

REWARDS_DIR = Path(grpo_jax.rewards.__file__).parent


def test_builtin_table():
    table = {name: (r.fn.__name__, r.kind, r.isolated) for name, r in BUILTIN_REWARDS.items()}
    assert table == {
        "math_verify": ("math_verify", "sample", True),  # sympy may hang: the only built-in in the worker pool
        "exact_int": ("exact_int", "sample", False),
        "countdown": ("countdown", "sample", False),
        "format": ("format_reward", "sample", False),
        "length_penalty": ("length_penalty", "group", False),
        "reward_model": ("reward_model", "batch", False),
    }
    assert get_reward("math_verify").fn is math_verify and get_reward("length_penalty").fn is length_penalty
    assert get_reward("reward_model").fn is reward_model
    assert set(BUILTIN_REWARDS) <= set(registered_rewards())


@pytest.mark.parametrize("module", ["verifiers", "length", "reward_model", "shaping", "scores", "pool", "config"])
def test_reward_modules_do_not_import_the_registry(module):
    """The registry imports the reward modules, never the other way round (no cycle)."""
    tree = ast.parse((REWARDS_DIR / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not imported & {"grpo_jax.rewards", "grpo_jax.rewards.registry", "grpo_jax.rewards.combine"}


def _half(prompt, completion, example):
    return 0.5


def test_register_reward_adds_a_name_and_refuses_a_taken_one():
    register_reward("test_registry_half", _half, isolated=False)
    register_reward("test_registry_half", _half, isolated=False)  # the same function again is fine
    assert get_reward("test_registry_half").fn is _half and "test_registry_half" in registered_rewards()
    with pytest.raises(ValueError, match="'format' is already registered"):
        register_reward("format", _half, isolated=False)
    with pytest.raises(ValueError, match="'test_registry_half' is already registered"):
        register_reward("test_registry_half", lambda p, c, e: 1.0, isolated=False)
    with pytest.raises(ValueError, match="group rewards run in-process; pass isolated=False"):
        register_reward("test_registry_group", kind="group")
    with pytest.raises(ValueError, match="kind must be 'sample', 'group' or 'batch'"):
        register_reward("test_registry_bad", _half, kind="token", isolated=False)


def test_terms_resolved_once_are_used_as_given(monkeypatch):
    soft_format = RewardSpec(name="format", weight=0.5, kwargs={"mode": "soft"})
    cfg = RewardsConfig(fns=(RewardSpec(name="exact_int"), soft_format))
    terms = resolve_rewards(cfg)
    completions = ["<think>x</think><answer>4</answer>", "4"]
    expected, _ = compute_rewards(cfg, ["p"] * 2, completions, [{"answer": "4"}] * 2, group_size=2)
    np.testing.assert_allclose(expected, [1 + 0.5, 1.0])  # exact 1, 1; soft format 1, 0

    def no_resolving(cfg):
        raise AssertionError("resolve_rewards called although terms were given")

    monkeypatch.setattr(combine, "resolve_rewards", no_resolving)
    total, _ = compute_rewards(cfg, ["p"] * 2, completions, [{"answer": "4"}] * 2, group_size=2, terms=terms)
    np.testing.assert_array_equal(total, expected)
    _, values, _ = reward_table(cfg, ["p"] * 2, completions, [{"answer": "4"}] * 2, group_size=2, terms=terms)
    np.testing.assert_array_equal(values["format"], [1.0, 0.0])
    other = RewardsConfig(fns=(RewardSpec(name="exact_int"),))
    wrong = r"terms resolve \['exact_int', 'format'\] but cfg.fns configures \['exact_int'\]"
    with pytest.raises(ValueError, match=wrong):
        compute_rewards(other, ["p"], ["4"], [{"answer": "4"}], group_size=1, terms=terms)
