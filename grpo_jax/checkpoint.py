"""Orbax checkpoints of the whole training state, for exact resume.

A checkpoint at step n holds the TrainState (params, optimizer state, step) and a JSON ``meta`` with everything else
the loop needs to continue exactly: the data order position, the reference-model refresh point and the metrics
state. Per-step randomness is ``fold_in(seed, step)``, so no RNG state is stored. Saves are atomic (orbax writes a
temporary directory and renames it); a latest checkpoint that still fails to restore is skipped with a warning and
the previous one is used; when checkpoints exist and none restores, ``CheckpointError`` stops the run before it
touches anything (starting over is the explicit ``grpo-jax train --restart``). The folder may be local or ``gs://``
(``grpo_jax.storage``).
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

from grpo_jax import storage
from grpo_jax.multihost import any_process, is_primary, sync

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none could be restored."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = storage.location(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none. Raises
        ``CheckpointError`` (naming the folder and the newest checkpoint's error) when there are checkpoints and none
        restores: a run must never silently start again from step 0 over its own history.

        ``abstract_state`` (e.g. ``jax.eval_shape`` of the state, with shardings) fixes the structure and placement.
        """
        self.manager.wait_until_finished()
        errors = []
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
                errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            if errors:
                log.warning("checkpoints in %s that could not be restored were skipped (%s); resumed from step %d",
                            self.directory, "; ".join(errors), step)
            return step, restored.state, restored.meta
        if errors:
            raise CheckpointError(f"none of the {len(errors)} checkpoints in {self.directory} could be restored (first "
                                  f"error: {errors[0]}); nothing was changed. Fix the storage and rerun, or start "
                                  "over with --restart")
        return None

    def reached_preemption(self, step: int) -> bool:
        """True at the step where every process should save and stop (see ``PreemptionWatch``)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def start_over(run_dir) -> None:
    """``--restart``: remove a run's checkpoints, metrics and TensorBoard events (its warm start stays)."""
    run_dir = storage.location(run_dir)
    if is_primary():
        for path in (run_dir / "checkpoints", run_dir / "tb", run_dir / "metrics.jsonl"):
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
        log.info("--restart: removed the checkpoints, metrics and events in %s", run_dir)
    sync("restart")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class PreemptionWatch:
    """When to save and stop because the machine is going away, the same step on every process.

    Multi-host (``jax.distributed`` running, as on a TPU slice): JAX's preemption service catches the SIGTERM on
    whichever host gets it and the hosts agree on a step (``reached_preemption_sync_point``, through Orbax, as MaxText
    does). Single process (CPU, one GPU/TPU host): a SIGTERM handler, checked once per step.
    """

    def __init__(self, ckpt: Checkpointer):
        self.ckpt = ckpt
        self.service = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self.flag: list[bool] = []
        self.old_handler = None if self.service else signal.signal(signal.SIGTERM, lambda *_: self.flag.append(True))

    def should_stop(self, step: int) -> bool:
        if self.service:
            return self.ckpt.reached_preemption(step)
        return any_process(bool(self.flag))

    def close(self) -> None:
        if self.old_handler is not None:
            signal.signal(signal.SIGTERM, self.old_handler)
