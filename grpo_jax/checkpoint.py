"""Orbax checkpoints of the whole training state, for exact resume.

A checkpoint at step n holds the TrainState (params, optimizer state, step) and a JSON ``meta`` with everything else
the loop needs to continue exactly: the data order position, the reference-model refresh point and the metrics
state. Per-step randomness is ``fold_in(seed, step)``, so no RNG state is stored. Saves are atomic (orbax writes a
temporary directory and renames it); a latest checkpoint that still fails to restore is skipped with a warning and
the previous one is used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute() if "://" not in str(directory) else directory
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
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        ``abstract_state`` (e.g. ``jax.eval_shape`` of the state, with shardings) fixes the structure and placement.
        """
        self.manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return step, restored.state, restored.meta
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
                log.warning("checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
