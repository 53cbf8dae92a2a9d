"""GRPO+DPO on the same rollout batch: L = (1-α)·L_GRPO + α·L_DPO (``hybrid_loss``), L_GRPO the GRPO objective on
all rows (``grpo_jax.algorithms.grpo``) and L_DPO the online pairs of each group (``grpo_jax.algorithms.dpo``).
Micro-batches hold whole groups."""
from __future__ import annotations

import dataclasses

from grpo_jax.algorithms.dpo import Paired, finalize_pairs, pairs_part
from grpo_jax.algorithms.grpo import GRPO
from grpo_jax.losses import finalize_objective_stats, grpo_objective_parts, hybrid_loss
from grpo_jax.train_step import Batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hybrid(Paired, GRPO):
    kind = "hybrid"

    def assemble(self, scored, passes, moments):
        batch, moments, metrics = super().assemble(scored, passes, moments)
        return self.with_rewards(batch, scored), moments, metrics

    def denominators(self, batch: Batch):
        return super().denominators(batch) | self.pairs_denominator(batch)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        num, _, pg = grpo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, mb.loss_mask_BxS, self.loss,
                                          behav_logp_BxT=mb.old_logp_BxS)
        dpo_part, dpo = pairs_part(self, logp_BxS, mb, dens)
        pg |= self.rollout_mismatch(logp_BxS, mb)
        return hybrid_loss(num / dens["pg"], dpo_part, alpha=self.algo.dpo.alpha), {"pg": pg, "dpo": dpo}

    def finalize(self, stats):
        return finalize_objective_stats(stats["pg"]) | finalize_pairs(stats["dpo"])
