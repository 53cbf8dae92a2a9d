"""Score a rollout batch: run every configured reward, clean and weight the values, log per-reward metrics.

Failure policy (a researcher wants the run to survive a bad reward function): a call that raises or times out
scores 0 and is counted in ``reward/<name>/errors``, and the first traceback of each (reward, error kind) is logged
once per process; a value that is not a finite real number within ±``MAX_ABS_SCORE`` (None, a string, a list, NaN,
±inf, an int of 10**400, ...; rules in :func:`~grpo_jax.rewards.scores.as_score`), or a group/batch reward's array
of the wrong shape, scores 0 and is counted in ``reward/<name>/invalid``; in-process calls left unmade when
``RewardsConfig.inline_timeout_s`` runs out score 0 and are counted in ``reward/<name>/timed_out``. Invalid and
timed-out values are logged once per reward per batch. The returned total is therefore always finite.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grpo_jax.rewards.config import RewardsConfig, RewardSpec
from grpo_jax.rewards.pool import BUDGET_SPENT, Outcome, RewardPool, run_inline
from grpo_jax.rewards.registry import RegisteredReward, check_kwargs, get_reward
from grpo_jax.rewards.scores import MAX_ABS_SCORE, Invalid, as_score, describe
from grpo_jax.rewards.shaping import overlong_penalty, zero_variance_fraction

logger = logging.getLogger(__name__)
_logged_errors: set[tuple[str, str]] = set()


@dataclass(frozen=True, kw_only=True)
class RewardTerm:
    """One configured reward, looked up and checked (``resolve_rewards``)."""

    spec: RewardSpec
    reward: RegisteredReward
    kwargs: dict[str, Any]
    correct_from: str | None


def resolve_rewards(cfg: RewardsConfig) -> tuple[RewardTerm, ...]:
    """Look every reward up and check its kwargs, so a typo fails before the first rollout. A run resolves once and
    passes the terms to every ``reward_table`` / ``compute_rewards`` call (``terms=``)."""
    names = [spec.name for spec in cfg.fns]
    terms = []
    for spec in cfg.fns:
        reward, kwargs = get_reward(spec.name), dict(spec.kwargs)
        correct_from = kwargs.pop("correct_from", None) if reward.kind == "group" else None
        if reward.kind == "group":
            sample_names = [n for n in names if get_reward(n).kind == "sample"]
            if correct_from not in sample_names:
                raise ValueError(
                    f"reward {spec.name!r}: kwargs.correct_from must name a sample reward of this config "
                    f"({sample_names}), got {correct_from!r}"
                )
        check_kwargs(reward, kwargs)
        terms.append(RewardTerm(spec=spec, reward=reward, kwargs=kwargs, correct_from=correct_from))
    return tuple(sorted(terms, key=lambda t: t.reward.kind == "group"))  # sample rewards first: groups read them


def compute_rewards(
    cfg: RewardsConfig,
    prompts: Sequence[str],
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    group_size: int,
    lengths_B: np.ndarray | None = None,
    pool: RewardPool | None = None,
    terms: Sequence[RewardTerm] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """``(rewards_B float32, metrics)``; see :func:`reward_table`."""
    total_B, _, metrics = reward_table(
        cfg, prompts, completions, examples, group_size=group_size, lengths_B=lengths_B, pool=pool, terms=terms
    )
    return total_B, metrics


def reward_table(
    cfg: RewardsConfig,
    prompts: Sequence[str],
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    group_size: int,
    lengths_B: np.ndarray | None = None,
    pool: RewardPool | None = None,
    terms: Sequence[RewardTerm] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """``(rewards_B float32, {name: values_B}, metrics)`` for B completions laid out as consecutive groups of
    ``group_size``.

    lengths_B: completion lengths in tokens; required for overlong shaping, and used by group rewards
      (otherwise they see character lengths).
    pool: the run's :class:`RewardPool`; without one, a temporary pool is started for isolated rewards.
    terms: ``resolve_rewards(cfg)``, resolved once by the caller; without them every call resolves ``cfg`` again.
    """
    B = len(completions)
    _check_batch(cfg, len(prompts), B, len(examples), group_size, lengths_B)
    terms = resolve_rewards(cfg) if terms is None else _checked_terms(terms, cfg)
    lengths = np.asarray(lengths_B if lengths_B is not None else [len(c) for c in completions], np.float64)
    values: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    total_B = np.zeros(B, np.float64)
    needs_pool = pool is None and any(t.reward.isolated for t in terms)
    with RewardPool(cfg.num_workers) if needs_pool else contextlib.nullcontext(pool) as pool:
        for term in terms:
            name = term.spec.name
            if term.reward.kind == "sample":
                args_list = list(zip(prompts, completions, examples))
                if term.reward.isolated:
                    outcomes = pool.map(term.reward.fn, args_list, term.kwargs, timeout_s=cfg.timeout_s)
                else:
                    outcomes = run_inline(term.reward.fn, args_list, term.kwargs, budget_s=cfg.inline_timeout_s)
            elif term.reward.kind == "group":
                spans = [slice(i, i + group_size) for i in range(0, B, group_size)]
                correct_B = values[term.correct_from] > 0
                outcomes = _run_blocks(term, [(lengths[s], correct_B[s]) for s in spans], group_size, cfg)
            else:
                outcomes = _run_blocks(term, [(list(prompts), list(completions), list(examples))], B, cfg)
            values[name], counts = _clean(name, outcomes)
            metrics |= {f"reward/{name}/{kind}": float(n) for kind, n in counts.items()}
            metrics[f"reward/{name}/mean"] = float(values[name].mean())
            total_B += term.spec.weight * values[name]
    if cfg.overlong is not None:
        over = cfg.overlong
        penalty_B = np.asarray(overlong_penalty(lengths, over.max_len, over.buffer, over.factor), np.float64)
        metrics["reward/overlong/mean"] = float(penalty_B.mean())
        total_B += penalty_B
    total_B = total_B.astype(np.float32)
    metrics["reward/total/mean"] = float(total_B.mean())
    metrics["reward/total/std"] = float(total_B.std())
    metrics["reward/zero_variance_fraction"] = float(zero_variance_fraction(total_B, group_size))
    return total_B, values, metrics


def _check_batch(cfg: RewardsConfig, P: int, B: int, E: int, group_size: int, lengths_B) -> None:
    """P prompts, B completions and E examples fit together, the group size and lengths_B (needed for overlong)."""
    if P != B or E != B:
        raise ValueError(f"compute_rewards: got {P} prompts, {B} completions, {E} examples")
    if group_size < 1 or B % group_size:
        raise ValueError(f"compute_rewards: batch size {B} is not a multiple of group_size={group_size}")
    if lengths_B is not None and np.shape(lengths_B) != (B,):
        raise ValueError(f"compute_rewards: lengths_B must have shape ({B},), got {np.shape(lengths_B)}")
    if cfg.overlong is not None and lengths_B is None:
        raise ValueError("compute_rewards: RewardsConfig.overlong is set, so lengths_B (tokens) must be given")


def _checked_terms(terms: Sequence[RewardTerm], cfg: RewardsConfig) -> Sequence[RewardTerm]:
    """``terms`` when they are the resolved rewards of ``cfg.fns`` (same specs); else a ValueError naming both."""
    if {t.spec.name: t.spec for t in terms} != {spec.name: spec for spec in cfg.fns}:  # names are unique
        raise ValueError(f"compute_rewards: terms resolve {[t.spec.name for t in terms]} but cfg.fns configures "
                         f"{[s.name for s in cfg.fns]}; pass terms=resolve_rewards(cfg)")
    return terms


def _run_blocks(term: RewardTerm, args_list: list[tuple], block_size: int, cfg: RewardsConfig) -> list[Outcome]:
    """Call a group or batch reward once per block (a group, or the whole batch); each call must return
    ``block_size`` values (a block whose call fails errors as a whole; one of another shape is invalid as a whole)."""
    outcomes = []
    for result in run_inline(term.reward.fn, args_list, term.kwargs, budget_s=cfg.inline_timeout_s):
        if result.error:
            outcomes += [result] * block_size
        elif (values := _block_values(result.value, block_size)) is None:
            outcomes += [Outcome(value=Invalid(f"{describe(result.value)}, not {block_size} values"))] * block_size
        else:
            outcomes += [Outcome(value=v) for v in values]
    return outcomes


def _block_values(value: object, block_size: int) -> list | None:
    """The ``block_size`` elements of a 1-D array-like, or None for anything else (never raises)."""
    try:
        array = np.asarray(value, dtype=object)
    except Exception:
        return None
    return list(array) if array.shape == (block_size,) else None


def _clean(name: str, outcomes: Sequence[Outcome]) -> tuple[np.ndarray, dict[str, int]]:
    """Values as float64, 0 where a call failed or was not made or its value is not a score, plus the three counts."""
    values, counts = np.zeros(len(outcomes), np.float64), {"errors": 0, "invalid": 0, "timed_out": 0}
    first_invalid = None
    for i, outcome in enumerate(outcomes):
        if outcome.error == BUDGET_SPENT:
            counts["timed_out"] += 1
        elif outcome.error is not None:
            counts["errors"] += 1
            if (name, outcome.error) not in _logged_errors:
                _logged_errors.add((name, outcome.error))
                logger.warning(
                    "reward %r: %s (scored 0; logged once per error kind)\n%s", name, outcome.error, outcome.traceback
                )
        elif (score := as_score(outcome.value)) is not None:
            values[i] = score
        else:
            counts["invalid"] += 1
            first_invalid = describe(outcome.value) if first_invalid is None else first_invalid
    if counts["invalid"]:
        logger.warning(
            "reward %r: %d of %d values are not finite real numbers within ±%g (scored 0, counted in "
            "reward/%s/invalid); the first: %s",
            name, counts["invalid"], len(outcomes), MAX_ABS_SCORE, name, first_invalid,
        )
    if counts["timed_out"]:
        logger.warning(
            "reward %r: inline_timeout_s spent; %d of %d samples not scored (scored 0, counted in reward/%s/timed_out)",
            name, counts["timed_out"], len(outcomes), name,
        )
    return values, counts
