"""GRPO+DPO on the same rollout batch: L = (1-α)·L_GRPO + α·L_DPO (``hybrid_loss``), L_GRPO the GRPO objective on
all rows (``grpo_jax.algorithms.grpo``) and L_DPO the online pairs of each group (``grpo_jax.algorithms.dpo``).
Micro-batches hold whole groups."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax.numpy as jnp

from grpo_jax.algorithms.base import refuse_grpo_options
from grpo_jax.algorithms.dpo import (
    check_paired_config,
    check_whole_groups,
    finalize_pairs,
    pairs_denominator,
    pairs_part,
)
from grpo_jax.algorithms.grpo import GRPO
from grpo_jax.losses import finalize_objective_stats, grpo_objective_parts, hybrid_loss
from grpo_jax.train_step import Batch

if TYPE_CHECKING:
    from grpo_jax.experiment import ExperimentConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hybrid(GRPO):
    kind = "hybrid"
    contiguous = True

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        refuse_grpo_options(cls.kind, cfg)
        check_paired_config(cls.kind, cfg)

    @property
    def needs_reference(self) -> bool:
        return True

    def assemble(self, scored, passes, moments):
        batch, moments, metrics = super().assemble(scored, passes, moments)
        return batch.replace(rewards_B=jnp.asarray(scored.rewards_B, jnp.float32)), moments, metrics

    def denominators(self, batch: Batch):
        return super().denominators(batch) | {"pairs": pairs_denominator(batch.rewards_B, self.group_size)}

    def check_batch(self, rows: int, micro_batches: int) -> None:
        check_whole_groups(self.kind, rows, micro_batches, self.group_size)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        num, _, pg = grpo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, mb.loss_mask_BxS, self.loss)
        dpo_part, dpo = pairs_part(self, logp_BxS, mb, dens)
        return hybrid_loss(num / dens["pg"], dpo_part, alpha=self.algo.dpo.alpha), {"pg": pg, "dpo": dpo}

    def finalize(self, stats):
        return finalize_objective_stats(stats["pg"]) | finalize_pairs(stats["dpo"])
