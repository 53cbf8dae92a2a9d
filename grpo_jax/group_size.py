"""Dynamic group size: spend a fixed rollout token budget where groups carry signal (host side, NumPy).

A group whose responses all succeed or all fail has zero group-relative advantage, so its samples are wasted; a
group with mixed outcomes carries the signal. Sizes decide array shapes, so this runs on the host between steps:
``allocate_group_sizes`` picks per-prompt sizes from last time's success rates, ``ragged_group_ids`` lays the
samples out for ``group_advantages(..., group_ids_B=..., num_groups=P)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def allocate_group_sizes(
    prev_success_P,
    *,
    token_budget: float,
    mean_length_P,
    min_size: int,
    max_size: int,
    floor: float = 0.1,
    max_samples: int | None = None,
) -> np.ndarray:
    """Integer group sizes n_p for P prompts within a token budget. With p the previous success rate of prompt p
    (use 0.5 for a prompt never seen), L_p its mean completion length and the weight

        w_p = sqrt(p (1 - p)) + floor      (the std of a Bernoulli(p) reward, 0 for solved/unsolved prompts, plus a
                                           floor so they still grow once the mixed ones are served)

    every prompt starts at min_size; each further sample k = min_size+1 .. max_size of prompt p is an entry with
    level k / w_p (the water level c at which c·w_p reaches k). Entries are bought in increasing level (ties: the
    lower prompt index first) while their cost L_p fits in what is left of the budget; an entry that does not fit
    is skipped (and so are that prompt's later ones, which cost as much); with ``max_samples`` buying stops once
    Σ_p n_p reaches it (a fixed number of rollout rows). This is the highest-averages (D'Hondt) integer form of
    water-filling n_p = clip(c·w_p, min_size, max_size) at the largest affordable level c.

    Deterministic; Σ_p n_p L_p <= token_budget, Σ_p n_p <= max_samples and min_size <= n_p <= max_size. Raises if
    even min_size for every prompt exceeds the budget (or the rows). Returns int64 (P,).
    """
    p_P = np.asarray(prev_success_P, np.float64)
    len_P = np.asarray(mean_length_P, np.float64)
    if p_P.ndim != 1 or len_P.shape != p_P.shape or p_P.size == 0:
        raise ValueError(
            f"prev_success_P and mean_length_P must be 1-D of one length > 0, got {p_P.shape} and {len_P.shape}")
    if not np.all((p_P >= 0) & (p_P <= 1)):
        raise ValueError(f"prev_success_P must lie in [0, 1] (use 0.5 for an unseen prompt), got {p_P}")
    if not np.all(len_P > 0):
        raise ValueError(f"mean_length_P must be > 0, got {len_P}")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0 (it keeps every weight positive), got {floor}")
    if min_size * len_P.sum() > token_budget:
        raise ValueError(f"token_budget={token_budget} cannot pay min_size={min_size} samples per prompt "
                         f"({min_size * len_P.sum():g} tokens at the mean lengths)")
    if max_samples is not None and max_samples < min_size * p_P.size:
        raise ValueError(f"max_samples={max_samples} cannot hold min_size={min_size} samples for {p_P.size} prompts")
    w_P = np.sqrt(p_P * (1.0 - p_P)) + floor
    n_P = np.full(p_P.shape, min_size, np.int64)
    k_E = np.tile(np.arange(min_size + 1, max_size + 1), p_P.size)
    p_E = np.repeat(np.arange(p_P.size), max_size - min_size)
    left = token_budget - min_size * float(len_P.sum())
    room = np.inf if max_samples is None else max_samples - int(n_P.sum())
    for i in p_E[np.lexsort((p_E, k_E / w_P[p_E]))]:
        if room <= 0:
            break
        if len_P[i] <= left:
            room -= 1
            n_P[i] += 1
            left -= len_P[i]
    return n_P


def ragged_group_ids(sizes_P, pad_to: int) -> np.ndarray:
    """Segment ids for groups of ``sizes_P`` samples laid out contiguously, padded with -1 to ``pad_to``:

        sizes (2, 3), pad_to 7  ->  [0, 0, 1, 1, 1, -1, -1]

    the ``group_ids_B`` of ``group_advantages``/``rloo_advantages``/``normalized_advantages`` (num_groups = P).
    Returns int32 (pad_to,).
    """
    sizes_P = np.asarray(sizes_P)
    if sizes_P.ndim != 1 or not np.issubdtype(sizes_P.dtype, np.integer) or np.any(sizes_P < 1):
        raise ValueError(f"sizes_P must be a 1-D array of positive integers, got {sizes_P!r}")
    if sizes_P.sum() > pad_to:
        raise ValueError(f"pad_to={pad_to} is smaller than the {int(sizes_P.sum())} samples of sizes_P")
    ids = np.repeat(np.arange(sizes_P.size, dtype=np.int32), sizes_P)
    return np.concatenate([ids, np.full(pad_to - ids.size, -1, np.int32)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicGroupConfig:
    """``rollout.dynamic_group``: per-prompt group sizes instead of a fixed G, in the same P·G rollout rows.

    The budget is P·G·L̄ tokens, L̄ the mean completion length of the previous step (max_new_tokens before the
    first); prompts are sized by ``allocate_group_sizes`` from the success rate and mean length of their ``key``
    (an example field: ``question`` tracks each prompt, ``level`` pools a difficulty level), kept as exponential
    moving averages with ``momentum`` (a key never seen counts as p = 0.5 at the batch's mean length).
    """

    min_size: int = 2
    max_size: int = 16
    key: str = "question"
    momentum: float = 0.9
    floor: float = 0.1

    def __post_init__(self):
        if not 2 <= self.min_size <= self.max_size:
            raise ValueError(
                f"rollout.dynamic_group: need 2 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"rollout.dynamic_group.momentum must be in [0, 1), got {self.momentum}")
        if not self.floor > 0:
            raise ValueError(f"rollout.dynamic_group.floor must be > 0, got {self.floor}")


class GroupHistory:
    """Host-side state of dynamic group sizing: per key, the moving-average success rate and completion length.
    ``to_json``/``from_json`` put it into the checkpoint's meta, so a resumed run sizes its groups identically."""

    def __init__(self, cfg: DynamicGroupConfig, stats: dict[str, list[float]] | None = None,
                 mean_length: float | None = None):
        self.cfg, self.stats, self.mean_length = cfg, dict(stats or {}), mean_length

    def sizes(self, examples: Sequence[dict], rows: int, max_new_tokens: int) -> np.ndarray:
        """Group sizes for ``examples`` (one per prompt) that fill at most ``rows`` rollout rows."""
        keys = [self._key(ex) for ex in examples]
        mean_len = self.mean_length or float(max_new_tokens)
        p_P = np.array([self.stats.get(k, [0.5, mean_len])[0] for k in keys])
        len_P = np.array([max(self.stats.get(k, [0.5, mean_len])[1], 1.0) for k in keys])
        return allocate_group_sizes(p_P, token_budget=rows * mean_len, mean_length_P=len_P, min_size=self.cfg.min_size,
                                    max_size=self.cfg.max_size, floor=self.cfg.floor, max_samples=rows)

    def update(self, examples: Sequence[dict], sizes_P, correct_B, lengths_B) -> None:
        """Fold one step's outcomes in (rows laid out by ``ragged_group_ids(sizes_P, ...)``)."""
        ends = np.cumsum(sizes_P)
        mu = self.cfg.momentum
        for ex, lo, hi in zip(examples, ends - sizes_P, ends):
            p, n = float(np.mean(correct_B[lo:hi])), float(np.mean(lengths_B[lo:hi]))
            key = self._key(ex)
            old = self.stats.get(key)
            self.stats[key] = [p, n] if old is None else [mu * old[0] + (1 - mu) * p, mu * old[1] + (1 - mu) * n]
        self.mean_length = float(np.mean(lengths_B[: int(ends[-1])]))

    def _key(self, ex: dict) -> str:
        if self.cfg.key not in ex:
            raise ValueError(
                f"rollout.dynamic_group.key={self.cfg.key!r} is not an example field; fields: {sorted(ex)}")
        return str(ex[self.cfg.key])

    def to_json(self) -> dict:
        return {"stats": self.stats, "mean_length": self.mean_length}

    @classmethod
    def from_json(cls, cfg: DynamicGroupConfig, data: dict) -> GroupHistory:
        return cls(cfg, data["stats"], data["mean_length"])


def rollout_rows(examples: Sequence[dict], group_size: int, history: GroupHistory | None, max_new_tokens: int):
    """The P·G rows of one rollout step: ``(rows, sizes_P, n_valid, group_ids_B or None)``.

    Fixed groups repeat each example G times. With ``history`` (dynamic group size) example p fills ``sizes_P[p]``
    contiguous rows, the first ``n_valid`` rows; the rest repeat the last example as padding (group id -1: no loss,
    left out of every statistic).
    """
    P, rows_total = len(examples), len(examples) * group_size
    if history is None:
        sizes = np.full(P, group_size)
        return [ex for ex in examples for _ in range(group_size)], sizes, rows_total, None
    sizes = history.sizes(examples, rows_total, max_new_tokens)
    n_valid = int(sizes.sum())
    rows = [ex for ex, n in zip(examples, sizes) for _ in range(n)] + [examples[-1]] * (rows_total - n_valid)
    return rows, sizes, n_valid, ragged_group_ids(sizes, rows_total)
