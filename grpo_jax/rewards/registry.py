"""Typed reward registry: one table of the built-in rewards, rewards added with ``register_reward``, and
``"module:function"`` imports for custom rewards.

Three kinds of reward exist:

* ``sample``: ``fn(prompt: str, completion: str, example: Mapping[str, Any], **kwargs) -> float | None``, one call
  per completion. Verifiers are of this kind.
* ``group``: ``fn(lengths_N: np.ndarray, correct_N: np.ndarray, **kwargs) -> np.ndarray`` (shape ``[N]``), one call
  per group of N completions of the same prompt; it sees the whole group (the dynamic length penalty).
* ``batch``: ``fn(prompts, completions, examples, **kwargs) -> np.ndarray`` (shape ``[B]``), one call per batch
  (the reward model, which batches and jits its forward pass).

``isolated=True`` means the function may hang (sympy, user code) and is run in the timeout worker pool; it must
then be importable by reference (a module-level function), since workers are fresh processes.

The reward modules are plain functions that know nothing of this registry; it imports them and lists them below.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from grpo_jax.rewards.length import length_penalty
from grpo_jax.rewards.reward_model import reward_model
from grpo_jax.rewards.verifiers import countdown, exact_int, format_reward, math_verify

RewardKind = Literal["sample", "group", "batch"]


@dataclass(frozen=True, kw_only=True)
class RegisteredReward:
    name: str
    fn: Callable
    kind: RewardKind
    isolated: bool

    def __post_init__(self):
        _check_kind(self.name, self.kind, self.isolated)


def _check_kind(name: str, kind: str, isolated: bool) -> None:
    if kind not in ("sample", "group", "batch"):
        raise ValueError(f"reward {name!r}: kind must be 'sample', 'group' or 'batch', got {kind!r}")
    if kind != "sample" and isolated:
        raise ValueError(f"reward {name!r}: {kind} rewards run in-process; pass isolated=False")


_BUILTIN_TABLE: tuple[tuple[str, Callable, RewardKind, bool], ...] = (
    # name            function        kind      isolated
    ("math_verify",    math_verify,    "sample", True),  # sympy can hang: run in the timeout worker pool
    ("exact_int",      exact_int,      "sample", False),
    ("countdown",      countdown,      "sample", False),
    ("format",         format_reward,  "sample", False),
    ("length_penalty", length_penalty, "group",  False),
    ("reward_model",   reward_model,   "batch",  False),
)
BUILTIN_REWARDS: dict[str, RegisteredReward] = {
    name: RegisteredReward(name=name, fn=fn, kind=kind, isolated=isolated)
    for name, fn, kind, isolated in _BUILTIN_TABLE
}
_ADDED: dict[str, RegisteredReward] = {}  # register_reward's


def register_reward(name: str, fn: Callable | None = None, *, kind: RewardKind = "sample", isolated: bool = True):
    """Register ``fn`` under ``name``; usable as ``@register_reward("name")`` or ``register_reward("name", fn)``."""
    _check_kind(name, kind, isolated)  # at the call, before a decorated function exists

    def add(f: Callable) -> Callable:
        taken = BUILTIN_REWARDS.get(name) or _ADDED.get(name)
        if taken is not None and taken.fn is not f:
            raise ValueError(f"register_reward: the name {name!r} is already registered to {taken.fn!r}")
        _ADDED[name] = RegisteredReward(name=name, fn=f, kind=kind, isolated=isolated)
        return f

    return add if fn is None else add(fn)


def registered_rewards() -> tuple[str, ...]:
    return tuple(sorted(BUILTIN_REWARDS.keys() | _ADDED.keys()))


def get_reward(ref: str | Callable) -> RegisteredReward:
    """Resolve a registered name, a ``"package.module:function"`` path, or a callable (a sample reward).

    Custom rewards (paths and callables) are isolated in the worker pool, since they may hang.
    """
    if callable(ref):
        name = f"{ref.__module__}:{ref.__qualname__}"
        return RegisteredReward(name=name, fn=ref, kind="sample", isolated=True)
    if ref in BUILTIN_REWARDS or ref in _ADDED:
        return BUILTIN_REWARDS.get(ref) or _ADDED[ref]
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {ref!r}: cannot import it ({type(e).__name__}: {e})") from e
        if not callable(fn):
            raise ValueError(f"reward {ref!r}: {fn!r} is not callable")
        return RegisteredReward(name=ref, fn=fn, kind="sample", isolated=True)
    raise ValueError(
        f"unknown reward {ref!r}; registered: {', '.join(registered_rewards())} "
        "(or give a 'package.module:function' path)"
    )


def check_kwargs(reward: RegisteredReward, kwargs: dict) -> None:
    """Fail fast, before any rollout, if ``kwargs`` do not fit the reward function's signature."""
    positional = {
        "sample": ("prompt", "completion", "example"),
        "group": ("lengths_N", "correct_N"),
        "batch": ("prompts", "completions", "examples"),
    }[reward.kind]
    try:
        inspect.signature(reward.fn).bind(*positional, **kwargs)
    except TypeError as e:
        raise ValueError(f"reward {reward.name!r}: kwargs {sorted(kwargs)} do not fit its signature ({e})") from e
