"""``RunState``: everything a checkpoint holds, saved and restored together."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from flax import nnx

from grpo_jax.advantages import RunningMoments
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.data import OrderState
from grpo_jax.group_size import GroupHistory
from grpo_jax.train_state import TrainState, trained

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunState:
    """The train state; the reference params (checkpointed when ``keep_ref``: it is refreshed from the policy); the
    running reward moments (checkpointed when ``keep_moments``: the algorithm uses them); the data order (a two-int
    state) and the dynamic group sizes' history (in the checkpoint's JSON meta). Stages return new states."""

    train: TrainState
    ref_params: nnx.State | None
    moments: RunningMoments
    order: OrderState
    history: GroupHistory | None
    keep_ref: bool = False
    keep_moments: bool = False
    # rollout.mode one_step_off/async: the k params the in-flight batches are sampled from (grpo_jax.pipeline)
    sampler_params: tuple[nnx.State, ...] = ()
    frozen: Callable | None = None  # LoRA: the filter of the frozen base weights, left out of checkpoints

    def _checkpointed(self, train: TrainState) -> TrainState:
        return train.replace(params=trained(train.params, self.frozen)[1]) if self.frozen is not None else train

    def _arrays(self) -> dict:
        return ({"train": self._checkpointed(self.train)} | ({"ref": self.ref_params} if self.keep_ref else {})
                | ({"adv": self.moments} if self.keep_moments else {})
                | ({"sampler": list(self.sampler_params)} if self.sampler_params else {}))

    def save(self, ckpt: Checkpointer, step: int, *, wait: bool = False) -> None:
        meta = {"order": dataclasses.asdict(self.order)}
        if self.history is not None:
            meta["groups"] = self.history.to_json()
        ckpt.save(step, self._arrays(), meta, wait=wait)

    def restore(self, ckpt: Checkpointer) -> tuple[int, RunState]:
        """(step, state) of the newest checkpoint that restores, or (0, self) when there is none (raises
        ``CheckpointError`` when checkpoints exist and none restores)."""
        restored = ckpt.restore_latest(abstract_like(self._arrays()))
        if restored is None:
            return 0, self
        step, saved, meta = restored
        history = None if self.history is None else GroupHistory.from_json(self.history.cfg, meta["groups"])
        log.info("resumed from the checkpoint at step %d", step)
        train = saved["train"]
        if self.frozen is not None:  # the adapters (and optimizer state) saved; the base weights are the loaded ones
            train = train.replace(params=nnx.merge_state(trained(self.train.params, self.frozen)[0], train.params))
        return step, dataclasses.replace(self, train=train, ref_params=saved.get("ref", self.ref_params),
                                         moments=saved.get("adv", self.moments), order=OrderState(**meta["order"]),
                                         history=history, sampler_params=tuple(saved.get("sampler", ())))
