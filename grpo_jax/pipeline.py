"""Rollouts ahead of the updates (``rollout.mode`` one_step_off / async): generation and scoring of later batches
run in a background thread while the main thread trains.

Batch n is sampled and scored with the params after v(n) = max(0, n - k) updates, k the depth (1 for one_step_off,
``rollout.max_staleness`` for async): at the start of step n the current params θ_n are copied for the sampler
(``time/weight_sync_s``) and batch n + k is submitted, so no sample is more than k updates old
(``rollout/staleness`` = n - v(n)). The schedule is fixed by the step, not by timing: a run is reproducible, and
depth 0 samples exactly what the synchronous loop samples (in the thread, one batch at a time).

Checkpoints: a checkpoint after n updates holds the data order before batch n and the k param copies θ_{n-k} ..
θ_{n-1} (versions below 0 clipped to 0) that batches n .. n+k-1 are sampled from. A resumed run regenerates those
batches (same params, same keys, same prompts) instead of saving them, so it replays the uninterrupted run exactly;
the price is k extra param copies in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
from flax import nnx

from grpo_jax.data import OrderState, batch_at


@dataclasses.dataclass(frozen=True)
class Produced:
    """A batch sampled and scored in the background: ``sampling.score``'s outputs, the params version, the times."""

    collected: object  # sampling.Collected
    scored: object  # algorithms.Scored
    correct_B: object
    metrics: dict
    version: int
    rollout_s: float
    reward_s: float


def sampler_slots(depth: int, done: int) -> list[int]:
    """The param versions a checkpoint after ``done`` updates holds, slot i = max(0, done - depth + i)."""
    return [max(0, done - depth + i) for i in range(depth)]


class RolloutPipeline:
    """Submits batch m with the params of version max(0, m - depth); ``take(n)`` waits for batch n.

    ``produce(params, examples, step, version) -> Produced`` runs in the one background thread (generation, then
    rewards); ``to_sampler(params)`` is the weight sync (a copy, cast to the sampler's dtype).
    ``order``: the data order before batch ``start``; ``snapshots``: {version: params} restored from a checkpoint
    (``sampler_slots(depth, start)``), empty for a fresh run."""

    def __init__(self, produce, to_sampler, *, depth: int, start: int, order: OrderState,
                 snapshots: dict[int, nnx.State], splits_train, batch_prompts: int, data_seed: int):
        self.produce, self.to_sampler, self.depth = produce, to_sampler, depth
        self.batch = dict(examples=splits_train, batch_size=batch_prompts, seed=data_seed)
        self.orders = {start: order}  # the data order before batch m
        self.snapshots = dict(snapshots)
        self.futures: dict[int, Future] = {}
        self.next = start
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grpo-jax-rollout")

    def fill(self, step: int, params: nnx.State) -> float:
        """Submit every batch up to ``step + depth``; ``params`` are θ_step (before update ``step``). Returns the
        seconds spent copying them for the sampler (0 when no new batch uses them)."""
        start = time.perf_counter()
        if step not in self.snapshots and self.next <= step + self.depth:
            self.snapshots[step] = jax.block_until_ready(self.to_sampler(params))  # a copy: the update donates θ
        sync_s = time.perf_counter() - start
        while self.next <= step + self.depth:
            m, version = self.next, max(0, self.next - self.depth)
            examples, self.orders[m + 1] = batch_at(self.batch["examples"], self.orders[m],
                                                    batch_size=self.batch["batch_size"], seed=self.batch["seed"])
            self.futures[m] = self.pool.submit(self.produce, self.snapshots[version], examples, m, version)
            self.next += 1
        return sync_s

    def take(self, step: int) -> Produced:
        """Batch ``step`` (re-raises what its generation or scoring raised); drops the copies no batch needs."""
        produced = self.futures.pop(step).result()
        oldest = max(0, step + 1 - self.depth)
        for version in [v for v in self.snapshots if v < oldest]:
            del self.snapshots[version]
        return produced

    def checkpoint_state(self, done: int) -> tuple[OrderState, tuple[nnx.State, ...]]:
        """(the data order before batch ``done``, the params of ``sampler_slots(depth, done)``) for a checkpoint."""
        return self.orders[done], tuple(self.snapshots[v] for v in sampler_slots(self.depth, done))

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
