"""GRPO and its critic-free descendants (presets grpo, dr_grpo, dapo, bnpo, gspo, cispo, and the bias fixes):

    A_i from the rewards (``algo.advantage``: group / RLOO / batch / running baselines and scales), optionally with
    a token term: the KL as a per-token reward (``train.kl_in_reward``) or the multi-scale
    A_it = A_i + α·ã_it, ã the KL return-to-go (``algo.advantage.token_alpha``), the KL being KL(π_θ‖π_ref) of the
    trainer's log-probs before the update (``Passes.policy``), not of the sampler's;
    L = num_pg / den_pg, the clipped surrogate + β·KL of ``grpo_objective_parts`` aggregated with ``loss.agg``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from grpo_jax.advantages import RunningMoments, kl_return_to_go, kl_reward_advantages, multiscale_advantages
from grpo_jax.algorithms.base import Algorithm, Passes, Scored, adv_metrics, rollout_batch, token_adv_metrics
from grpo_jax.losses import finalize_objective_stats, grpo_objective_parts
from grpo_jax.train_step import Batch

if TYPE_CHECKING:
    from grpo_jax.experiment import ExperimentConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPO(Algorithm):
    kind = "grpo"

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        adv, train = cfg.algo.advantage, cfg.train
        if cfg.rollout.group_size == 1 and adv.estimator == "group":
            raise ValueError(f"rollout.group_size=1 with advantage estimator 'group' (scale={adv.scale!r}) gives every "
                             "sample advantage 0; use group_size >= 2")
        if cfg.rollout.group_size == 1 and adv.estimator == "rloo":
            raise ValueError("rollout.group_size=1 leaves RLOO no other sample for its baseline; use group_size >= 2")
        if train.kl_in_reward and cfg.algo.loss.beta == 0:
            raise ValueError("train.kl_in_reward needs algo.loss.beta > 0 (the KL coefficient)")
        if adv.token_alpha > 0 and train.kl_in_reward:
            raise ValueError("algo.advantage.token_alpha adds the KL return-to-go to GRPO's advantages: it needs "
                             "train.kl_in_reward=false")
        if cfg.rollout.dynamic_group is not None and (train.mask_zero_variance or train.micro_batches > 1):
            raise ValueError("rollout.dynamic_group works with algo.kind=grpo, train.mask_zero_variance=false and "
                             "train.micro_batches=1 (ragged groups)")

    @property
    def needs_reference(self) -> bool:
        return self.algo.loss.beta > 0 or self.algo.advantage.token_alpha > 0

    @property
    def needs_policy_logprobs(self) -> bool:
        return self.kl_in_reward or self.algo.advantage.token_alpha > 0

    @property
    def stateful(self) -> bool:
        return self.algo.advantage.stateful

    def assemble(self, scored: Scored, passes: Passes, moments: RunningMoments
                 ) -> tuple[Batch, RunningMoments, dict[str, float]]:
        batch = rollout_batch(scored)
        adv_B, moments = self.sequence_advantages(scored, moments)
        batch = self.with_token_terms(batch, adv_B, self.reference(batch, passes), self.policy_logprobs(batch, passes),
                                      scored)
        metrics = token_adv_metrics(batch) if self.algo.advantage.token_alpha > 0 else adv_metrics(
            np.asarray(adv_B)[:scored.n_valid])
        if self.stateful:
            metrics |= {"adv/running_mean": float(moments.mean), "adv/running_std": float(np.sqrt(moments.var))}
        return batch, moments, metrics

    def with_token_terms(self, batch: Batch, adv_B, ref_logp_BxS, policy_logp_BxS, scored: Scored) -> Batch:
        """The batch with its advantage and reference log-probs: A_i, or the token-level A_it of ``kl_in_reward``
        (-β·k1 return-to-go, ``kl_reward_advantages``; the KL then leaves the loss) or of ``token_alpha`` > 0
        (``multiscale_advantages`` of u_it = -Σ_{t'>=t} (logp_it' - ref_it'), normalised by ``token_norm``). logp is
        ``policy_logp_BxS``, the trainer's log-probs before the update (``Passes.policy``, None when there is no token
        term); ``batch.old_logp_BxS`` stays the sampler's, the loss's behaviour policy."""
        mask, adv, cfg = batch.loss_mask_BxS, adv_B, self.algo.advantage
        if self.kl_in_reward:
            adv = kl_reward_advantages(adv_B, policy_logp_BxS, ref_logp_BxS, mask, self.algo.loss.beta)
            ref_logp_BxS = None
        if cfg.token_alpha > 0:
            ragged = scored.group_ids_B is not None
            groups = (dict(group_size=None, group_ids_B=scored.group_ids_B, num_groups=self.num_groups) if ragged
                      else dict(group_size=self.group_size))
            u_BxS = kl_return_to_go(policy_logp_BxS, ref_logp_BxS, mask)
            adv = multiscale_advantages(adv, u_BxS, mask, alpha=cfg.token_alpha, normalize=cfg.token_norm, **groups)
            ref_logp_BxS = ref_logp_BxS if self.loss.beta > 0 else None
        return batch.replace(ref_logp_BxS=ref_logp_BxS, adv=adv)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        num, _, stats = grpo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, mb.loss_mask_BxS,
                                             self.loss, behav_logp_BxT=mb.old_logp_BxS)
        return num / dens["pg"], {"pg": stats | self.rollout_mismatch(logp_BxS, mb)}

    def finalize(self, stats):
        return finalize_objective_stats(stats["pg"])
