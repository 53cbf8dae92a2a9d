"""Timeout worker pool for reward functions that can hang, plus the in-process runner with the same contract.

Workers are 'spawn'ed (never forked: JAX is multithreaded, and a forked copy of its runtime can deadlock). Each task
is one call ``fn(*args, **kwargs)``; its timeout starts when the worker has unpickled it (imports done), so a cold
worker importing sympy is not charged for that. A call that raises becomes an :class:`Outcome` with the exception's
type name and traceback; a call past its timeout, or a worker that dies, gets its worker killed and replaced, so
the pool keeps its size and the batch carries on. A worker sends back a score, never the returned object: the value
goes through :func:`~grpo_jax.rewards.scores.as_score` in the worker (a float, or an :class:`Invalid` description).

:func:`run_inline` runs in-process rewards under a per-batch time budget, checked between calls.
"""
from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from grpo_jax.rewards.scores import Invalid, as_score, describe

_CTX = multiprocessing.get_context("spawn")
_STARTED = "started"
BUDGET_SPENT = "BudgetSpent"  # the error kind of an inline call never started because the batch's budget ran out


@dataclass(frozen=True)
class Outcome:
    """The result of one call: ``value`` when ``error`` is None, else the error kind and its traceback text.

    ``error`` is the exception's type name, ``"Timeout"``, ``"WorkerDied"``, or ``BUDGET_SPENT`` (inline, not run).
    """

    value: Any = None
    error: str | None = None
    traceback: str | None = None


def run_inline(
    fn: Callable,
    args_list: Sequence[tuple],
    kwargs: dict[str, Any],
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome]:
    """Call ``fn`` in this process for each args tuple; exceptions become Outcomes. Values are returned as they are.

    budget_s: a call starts only while less than ``budget_s`` seconds (by ``clock``) have passed since the first
      call started. The call running when the budget runs out finishes and keeps its value (a call cannot be
      interrupted in-process); every later one is not made and gets ``Outcome(error=BUDGET_SPENT)``. None: no limit.
    """
    outcomes, start = [], clock()
    for i, args in enumerate(args_list):
        if budget_s is not None and clock() - start >= budget_s:
            note = f"not run: {i} of {len(args_list)} calls used the {budget_s}s budget"
            return outcomes + [Outcome(error=BUDGET_SPENT, traceback=note)] * (len(args_list) - i)
        try:
            outcomes.append(Outcome(value=fn(*args, **kwargs)))
        except Exception as e:  # a reward that raised must not end the run: it is counted and logged upstream
            outcomes.append(Outcome(error=type(e).__name__, traceback=traceback.format_exc()))
    return outcomes


def _scored(value: Any) -> float | Invalid:
    score = as_score(value)
    return Invalid(describe(value)) if score is None else score


def _serve(conn: Connection) -> None:
    """Worker main loop: receive a pickled (fn, args, kwargs), acknowledge, call, send the Outcome of its score back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the pool
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:
            return
        if not payload:
            return
        try:
            fn, args, kwargs = pickle.loads(payload)
        except BaseException as e:
            conn.send(Outcome(error=type(e).__name__, traceback=traceback.format_exc()))
            continue
        conn.send(_STARTED)
        try:
            outcome = Outcome(value=_scored(fn(*args, **kwargs)))
        except BaseException as e:
            outcome = Outcome(error=type(e).__name__, traceback=traceback.format_exc())
        try:
            conn.send(outcome)
        except Exception as e:  # the value itself did not pickle
            conn.send(Outcome(error=type(e).__name__, traceback=traceback.format_exc()))


class _Worker:
    def __init__(self) -> None:
        self.conn, child_conn = _CTX.Pipe()
        self.proc = _CTX.Process(target=_serve, args=(child_conn,), daemon=True, name="grpo-jax-reward-worker")
        self.proc.start()
        child_conn.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


@dataclass
class _Job:
    index: int
    deadline: float
    started: bool = False


class RewardPool:
    """``num_workers`` spawned processes that run reward calls under a per-call timeout.

    ``startup_timeout_s`` bounds the time a worker may take to receive and unpickle a task (process start and
    imports) before the per-call timeout begins. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, num_workers: int = 4, *, startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        if startup_timeout_s <= 0:
            raise ValueError(f"RewardPool: startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.startup_timeout_s = startup_timeout_s
        self._workers = [_Worker() for _ in range(num_workers)]
        self._lock = threading.Lock()  # one map at a time (a rollout thread scores while the main thread evaluates)

    def map(self, fn: Callable, args_list: Sequence[tuple], kwargs: dict[str, Any], *,
            timeout_s: float) -> list[Outcome]:
        """One Outcome per args tuple, in order: ``fn(*args, **kwargs)`` run in a worker under ``timeout_s``; a value
        comes back as a float score or an :class:`Invalid` (see :func:`~grpo_jax.rewards.scores.as_score`)."""
        if timeout_s <= 0:
            raise ValueError(f"RewardPool.map: timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            if not self._workers:
                raise RuntimeError("RewardPool.map: the pool is closed")
            return self._map(fn, args_list, kwargs, timeout_s)

    def _map(self, fn: Callable, args_list: Sequence[tuple], kwargs: dict[str, Any], timeout_s: float) -> list[Outcome]:
        try:
            payloads = [pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL) for args in args_list]
        except Exception as e:
            raise TypeError(
                f"RewardPool: cannot send {fn!r} and its arguments to a worker ({e}); isolated rewards must be "
                "module-level functions with picklable arguments"
            ) from e
        outcomes: list[Outcome | None] = [None] * len(payloads)
        todo, idle, busy = deque(range(len(payloads))), list(self._workers), {}
        while todo or busy:
            while todo and idle:
                worker, index = idle.pop(), todo.popleft()
                worker.conn.send_bytes(payloads[index])
                busy[worker] = _Job(index, time.monotonic() + self.startup_timeout_s)
            soonest = min(job.deadline for job in busy.values())
            by_conn = {worker.conn: worker for worker in busy}
            for conn in wait(list(by_conn), timeout=max(0.0, soonest - time.monotonic())):
                worker, job = by_conn[conn], busy[by_conn[conn]]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = Outcome(error="WorkerDied",
                                      traceback=f"reward worker exited with code {worker.proc.exitcode}")
                    idle.append(self._replace(worker))
                else:
                    if message == _STARTED:
                        job.deadline, job.started = time.monotonic() + timeout_s, True
                        continue
                    idle.append(worker)
                outcomes[job.index] = message
                del busy[worker]
            now = time.monotonic()
            for worker, job in list(busy.items()):
                if job.deadline <= now and not worker.conn.poll():
                    limit = (f"its {timeout_s}s timeout" if job.started
                             else f"startup_timeout_s={self.startup_timeout_s}")
                    outcomes[job.index] = Outcome(error="Timeout", traceback=f"{fn!r} exceeded {limit}")
                    del busy[worker]
                    idle.append(self._replace(worker))
        return outcomes

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send_bytes(b"")
            except OSError:
                pass
            worker.proc.join(timeout=1.0)
            worker.kill()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
