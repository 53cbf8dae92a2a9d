"""Group-level dynamic length penalty (Kimi k1.5's length reward).

Source: Kimi Team, "Kimi k1.5: Scaling Reinforcement Learning with LLMs", arXiv:2501.12599, section 2.3.3
("Length Penalty"). For the N responses to one prompt, with len(i) the length of response i:

    λ_i = 0.5 - (len(i) - min_len) / (max_len - min_len)
    r_i = λ_i            if response i is correct
    r_i = min(0, λ_i)    otherwise
    r_i = 0 for all i    if max_len == min_len

so among correct responses the shortest gets +0.5 and the longest -0.5, and wrong responses are only ever
penalised (never rewarded for being short). With ``reference="group"`` (the paper) min_len/max_len range over all N
responses; with ``reference="correct"`` they range over the correct responses only ("relative to the group's
correct responses"), λ is clipped to [-0.5, 0.5], and a group with fewer than two distinct correct lengths gets 0.
Kimi adds this term with a weight and warms it up; both are the caller's choice (the reward weight).
"""
from __future__ import annotations

from typing import Literal

import numpy as np


def length_penalty(
    lengths_N: np.ndarray, correct_N: np.ndarray, *, reference: Literal["group", "correct"] = "group"
) -> np.ndarray:
    """Kimi k1.5 length reward for one group (formula in the module docstring); returns float32 ``[N]``."""
    lengths_N = np.asarray(lengths_N, dtype=np.float64)
    correct_N = np.asarray(correct_N, dtype=bool)
    if lengths_N.ndim != 1 or correct_N.shape != lengths_N.shape:
        raise ValueError(
            f"length_penalty: lengths_N and correct_N must be 1-D of equal shape, got {lengths_N.shape} and "
            f"{correct_N.shape}"
        )
    if reference not in ("group", "correct"):
        raise ValueError(f"length_penalty: reference must be 'group' or 'correct', got {reference!r}")
    ref_N = lengths_N if reference == "group" else lengths_N[correct_N]
    if ref_N.size == 0 or ref_N.max() == ref_N.min():
        return np.zeros(lengths_N.shape, np.float32)
    lam_N = 0.5 - (lengths_N - ref_N.min()) / (ref_N.max() - ref_N.min())
    if reference == "correct":
        lam_N = np.clip(lam_N, -0.5, 0.5)
    return np.where(correct_N, lam_N, np.minimum(0.0, lam_N)).astype(np.float32)
