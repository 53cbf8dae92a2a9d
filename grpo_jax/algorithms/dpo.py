"""Online DPO on rollout groups (Rafailov et al. 2023; online pairs as in Guo et al. 2024): each group's best
response is chosen and its worst rejected against the frozen reference (``online_dpo_parts``), constant groups are
skipped, and

    L = Σ_p v_p ℓ_p / Σ_p v_p          (the pairs' denominator from the whole batch, ``denominators``)

Pairs are formed inside a micro-batch, so micro-batches hold whole groups (``contiguous``).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from grpo_jax.algorithms.base import Algorithm, Passes, Scored, refuse_grpo_options, rollout_batch
from grpo_jax.losses import finalize_dpo_stats, group_preference_pairs, online_dpo_parts
from grpo_jax.losses.terms import safe_divide
from grpo_jax.train_step import Batch

if TYPE_CHECKING:
    from grpo_jax.experiment import ExperimentConfig


def pairs_denominator(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """The number of valid online pairs in the whole batch (1 when there is none: the loss is then 0)."""
    if rewards_B is None:
        raise ValueError("online pairs need batch.rewards_B")
    pairs = jnp.sum(group_preference_pairs(rewards_B, group_size)[2], dtype=jnp.float32)
    return jnp.where(pairs > 0, pairs, 1.0)


def pairs_part(algo: Algorithm, logp_BxS, mb: Batch, dens) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(this micro-batch's share of the DPO loss, its stats with the numerator for ``dpo_loss``)."""
    if mb.ref_logp_BxS is None:
        raise ValueError(f"algo.kind={algo.kind} needs the reference model's log-probs (batch.ref_logp_BxS)")
    num, _, stats = online_dpo_parts(logp_BxS, mb.ref_logp_BxS, mb.loss_mask_BxS, mb.rewards_B, algo.group_size,
                                     algo.algo.dpo)
    stats["loss_num"] = jax.lax.stop_gradient(num)
    return num / dens["pairs"], stats


def finalize_pairs(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``dpo_loss``, ``dpo_pairs`` and ``dpo_<metric>`` of ``finalize_dpo_stats`` (reward accuracy, margins)."""
    out = {f"dpo_{k}": v for k, v in finalize_dpo_stats(stats).items()}
    return out | {"dpo_loss": safe_divide(stats["loss_num"], stats["pairs"]), "dpo_pairs": stats["pairs"]}


class Paired:
    """What every kind with online pairs shares: the reference is required, micro-batches hold whole groups, the
    batch carries the rewards that rank each group's pair, and the pairs' denominator comes from the whole batch."""

    contiguous = True

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        refuse_grpo_options(cls.kind, cfg)
        if cfg.rollout.group_size < 2:
            raise ValueError(f"algo.kind={cls.kind} pairs the best and worst response of a group; use "
                             "rollout.group_size >= 2")
        if cfg.train.batch_prompts % cfg.train.micro_batches:
            raise ValueError(f"algo.kind={cls.kind}: train.micro_batches={cfg.train.micro_batches} must divide "
                             f"train.batch_prompts={cfg.train.batch_prompts} (each micro-batch holds whole groups)")

    @property
    def needs_reference(self) -> bool:
        return True

    def check_batch(self, rows: int, micro_batches: int) -> None:
        if (rows // micro_batches) % self.group_size:
            raise ValueError(f"kind={self.kind}: micro-batches of {rows // micro_batches} rows must hold whole groups "
                             f"of group_size={self.group_size} (online pairs are formed inside a micro-batch)")

    def with_rewards(self, batch: Batch, scored: Scored) -> Batch:
        return batch.replace(rewards_B=jnp.asarray(scored.rewards_B, jnp.float32))

    def pairs_denominator(self, batch: Batch) -> dict[str, jax.Array]:
        return {"pairs": pairs_denominator(batch.rewards_B, self.group_size)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO(Paired, Algorithm):
    kind = "dpo"

    def assemble(self, scored: Scored, passes: Passes, moments):
        batch = rollout_batch(scored)
        return self.with_rewards(batch.replace(ref_logp_BxS=self.reference(batch, passes)), scored), moments, {}

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        super().check_config(cfg)
        if cfg.algo.loss.off_policy is not None:
            raise ValueError("algo.loss.off_policy corrects a policy-gradient term, which algo.kind=dpo has not "
                             "(online pairs against the reference); remove it, or use algo.kind=hybrid")

    @property
    def needs_proximal(self) -> bool:
        return False

    def denominators(self, batch: Batch):
        return self.pairs_denominator(batch)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        loss, stats = pairs_part(self, logp_BxS, mb, dens)
        return loss, {"dpo": stats}

    def finalize(self, stats):
        return finalize_pairs(stats["dpo"])
