"""Dynamic group size: spend a fixed rollout token budget where groups carry signal (host side, NumPy).

A group whose responses all succeed or all fail has zero group-relative advantage, so its samples are wasted; a
group with mixed outcomes carries the signal. Sizes decide array shapes, so this runs on the host between steps:
``allocate_group_sizes`` picks per-prompt sizes from last time's success rates, ``ragged_group_ids`` lays the
samples out for ``group_advantages(..., group_ids_B=..., num_groups=P)``.
"""
from __future__ import annotations

import numpy as np


def allocate_group_sizes(
    prev_success_P,
    *,
    token_budget: float,
    mean_length_P,
    min_size: int,
    max_size: int,
    floor: float = 0.1,
) -> np.ndarray:
    """Integer group sizes n_p for P prompts within a token budget. With p the previous success rate of prompt p
    (use 0.5 for a prompt never seen), L_p its mean completion length and the weight

        w_p = sqrt(p (1 - p)) + floor      (the std of a Bernoulli(p) reward, 0 for solved/unsolved prompts, plus a
                                           floor so they still grow once the mixed ones are served)

    every prompt starts at min_size; each further sample k = min_size+1 .. max_size of prompt p is an entry with
    level k / w_p (the water level c at which c·w_p reaches k). Entries are bought in increasing level (ties: the
    lower prompt index first) while their cost L_p fits in what is left of the budget; an entry that does not fit
    is skipped (and so are that prompt's later ones, which cost as much). This is the highest-averages (D'Hondt)
    integer form of water-filling n_p = clip(c·w_p, min_size, max_size) at the largest affordable level c.

    Deterministic; Σ_p n_p L_p <= token_budget and min_size <= n_p <= max_size. Raises if even min_size for every
    prompt exceeds the budget. Returns int64 (P,).
    """
    p_P = np.asarray(prev_success_P, np.float64)
    len_P = np.asarray(mean_length_P, np.float64)
    if p_P.ndim != 1 or len_P.shape != p_P.shape or p_P.size == 0:
        raise ValueError(f"prev_success_P and mean_length_P must be 1-D of one length > 0, got {p_P.shape} and {len_P.shape}")
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
    w_P = np.sqrt(p_P * (1.0 - p_P)) + floor
    n_P = np.full(p_P.shape, min_size, np.int64)
    k_E = np.tile(np.arange(min_size + 1, max_size + 1), p_P.size)
    p_E = np.repeat(np.arange(p_P.size), max_size - min_size)
    left = token_budget - min_size * float(len_P.sum())
    for i in p_E[np.lexsort((p_E, k_E / w_P[p_E]))]:
        if len_P[i] <= left:
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
