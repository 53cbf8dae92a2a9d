"""Deterministic epoch-wise order over examples with an exactly resumable position.

Epoch e visits the examples in ``permutation(seed, e)``; a batch that reaches the end of an epoch continues into
the next one, so every example is seen once per epoch and none is dropped. The state ``(epoch, position)`` is two
ints: save ``dataclasses.asdict(state)`` in a checkpoint and rebuild it with ``OrderState(**saved)`` to continue
with exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class OrderState:
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.position < 0:
            raise ValueError(
                f"OrderState: epoch and position must be >= 0, got epoch={self.epoch}, position={self.position}")


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(num_examples)`` seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(state: OrderState, *, num_examples: int, batch_size: int, seed: int) -> tuple[np.ndarray, OrderState]:
    """``(indices_B, next_state)``: the next ``batch_size`` example indices after ``state``."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"batch_indices: num_examples and batch_size must be >= 1, got {num_examples}, {batch_size}")
    if state.position >= num_examples:
        raise ValueError(
            f"batch_indices: state.position={state.position} is past the {num_examples} examples; wrong dataset?")
    epoch, position, chunks, needed = state.epoch, state.position, [], batch_size
    while needed:
        chunk = epoch_permutation(num_examples, seed, epoch)[position : position + needed]
        chunks.append(chunk)
        needed, position = needed - len(chunk), position + len(chunk)
        if position == num_examples:
            epoch, position = epoch + 1, 0
    return np.concatenate(chunks), OrderState(epoch=epoch, position=position)


def batch_at(examples: Sequence[dict], state: OrderState, *, batch_size: int,
             seed: int) -> tuple[list[dict], OrderState]:
    """``(examples of the batch, next_state)``; see :func:`batch_indices`."""
    indices, next_state = batch_indices(state, num_examples=len(examples), batch_size=batch_size, seed=seed)
    return [examples[i] for i in indices], next_state
