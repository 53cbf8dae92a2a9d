"""Reward configuration: which reward functions, their weights and arguments, timeouts, and overlong shaping."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RewardSpec:
    """One weighted reward term.

    name: a registered reward (``math_verify``, ``exact_int``, ``countdown``, ``format``, ``length_penalty``,
      ``reward_model``, or one added with ``register_reward``) or a ``"package.module:function"`` path.
    kwargs: keyword arguments for the function, e.g. ``{"mode": "soft"}`` for ``format``, ``{"path": ...}`` for
      ``reward_model``. Group rewards
      (``length_penalty``) also take ``correct_from``: the name of another reward in the config whose value > 0
      marks a response as correct.
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string, got {self.name!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"RewardSpec({self.name}).weight must be a finite float, got {self.weight}")
        if not all(isinstance(k, str) for k in self.kwargs):
            raise ValueError(f"RewardSpec({self.name}).kwargs keys must be strings, got {list(self.kwargs)}")


@dataclass(frozen=True, kw_only=True)
class OverlongConfig:
    """DAPO soft overlong punishment (see ``rewards.shaping.overlong_penalty``); lengths are in tokens.

    max_len should be the rollout's maximum number of new tokens; the penalty ramps from 0 at
    ``max_len - buffer`` to ``-factor`` at ``max_len``.
    """

    max_len: int
    buffer: int
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"OverlongConfig.max_len must be >= 1, got {self.max_len}")
        if not 0 < self.buffer <= self.max_len:
            raise ValueError(f"OverlongConfig.buffer must be in (0, max_len={self.max_len}], got {self.buffer}")
        if not (math.isfinite(self.factor) and self.factor >= 0):
            raise ValueError(f"OverlongConfig.factor must be a finite float >= 0, got {self.factor}")


@dataclass(frozen=True, kw_only=True)
class RewardsConfig:
    """The reward of a completion is ``Σ_k weight_k · r_k`` (+ the overlong penalty when ``overlong`` is set).

    timeout_s: per-call limit for isolated rewards (run in ``num_workers`` worker processes); a call past it, or
      one that raises, scores 0 and is counted in ``reward/<name>/errors``.
    inline_timeout_s: per-batch budget of each in-process reward (the built-in verifiers, the length penalty, the
      reward model), checked between calls: once it is spent, the call in progress keeps its score and the rest of
      the batch scores 0, counted in ``reward/<name>/timed_out``. None: no limit. The default, 60 s, is far above
      what the built-ins need (under 0.2 s per completion even for 200,000-character adversarial text, about 1 ms
      for ordinary text, so a 1,024-completion batch takes about a second), so it only cuts a reward that has gone
      wrong, without stalling the run; raise it for a slow custom inline reward (e.g. one calling a remote judge).
    """

    fns: tuple[RewardSpec, ...]
    timeout_s: float = 5.0
    inline_timeout_s: float | None = 60.0
    num_workers: int = 4
    overlong: OverlongConfig | None = None

    def __post_init__(self) -> None:
        if not self.fns:
            raise ValueError("RewardsConfig.fns must list at least one RewardSpec")
        names = [spec.name for spec in self.fns]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"RewardsConfig.fns: each reward may appear once (metrics are keyed by name); repeated: {repeated}"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"RewardsConfig.timeout_s must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.inline_timeout_s is not None and not (
            math.isfinite(self.inline_timeout_s) and self.inline_timeout_s > 0
        ):
            raise ValueError(
                "RewardsConfig.inline_timeout_s must be a finite number of seconds > 0, or null for no limit, "
                f"got {self.inline_timeout_s}"
            )
        if self.num_workers < 1:
            raise ValueError(f"RewardsConfig.num_workers must be >= 1, got {self.num_workers}")
