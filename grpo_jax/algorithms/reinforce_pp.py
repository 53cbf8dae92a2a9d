"""REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
arXiv:2501.03262): PPO's tricks without a critic. The KL to the reference is a per-token reward, the sequence reward
sits on the last completion token, the advantage is the return-to-go normalised over the whole batch's tokens (no
per-prompt baseline), and the loss is the clipped surrogate:

    ρ_it = r_i·[t = last] - β·(logp_it - ref_it),   G_it = Σ_{t'>=t} ρ_it',   A_it = (G_it - mean_B) / (std_B + ε)
    L = AGG_{i,t} -min(r_it·A_it, clip(r_it, 1-ε_lo, 1+ε_hi)·A_it)            (β = ``algo.loss.beta``; no KL term)

with mean_B, std_B (population) over the valid tokens of the batch and ε = ``algo.advantage.eps``; logp the
trainer's log-probs of the rollout before the update (``Passes.policy``; the sampler's may differ: bf16, top-k/top-p,
staleness), when β > 0.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from grpo_jax.advantages import reward_to_go, terminal_rewards, whiten
from grpo_jax.algorithms.base import Algorithm, Passes, Scored, rollout_batch, token_adv_metrics
from grpo_jax.losses import LossConfig, finalize_objective_stats, grpo_objective_parts
from grpo_jax.train_step import Batch


def reinforce_pp_advantages(rewards_B, old_logp_BxS, ref_logp_BxS, mask_BxS, *, beta: float, eps: float):
    """A_it of the module docstring (float32 [B, S], 0 where masked); ``ref_logp_BxS`` None means β·KL = 0."""
    mask = jnp.asarray(mask_BxS).astype(bool)
    kl_BxS = jnp.zeros(mask.shape) if ref_logp_BxS is None else jnp.where(mask, old_logp_BxS - ref_logp_BxS, 0.0)
    rho_BxS = terminal_rewards(jnp.asarray(rewards_B, jnp.float32), mask, per_token_BxT=-beta * kl_BxS)
    return whiten(reward_to_go(rho_BxS, mask), mask, eps=eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePP(Algorithm):
    kind = "reinforce_pp"

    @classmethod
    def step_loss(cls, loss: LossConfig) -> LossConfig:
        return dataclasses.replace(loss, beta=0.0)  # β weighs the KL in the reward, not in the loss

    @property
    def needs_policy_logprobs(self) -> bool:
        return self.algo.loss.beta > 0  # the KL reward is the trainer's KL(π_θ‖π_ref)

    def assemble(self, scored: Scored, passes: Passes, moments):
        batch = rollout_batch(scored)
        logp = self.policy_logprobs(batch, passes)
        adv = reinforce_pp_advantages(scored.rewards_B, batch.old_logp_BxS if logp is None else logp,
                                      self.reference(batch, passes),
                                      batch.loss_mask_BxS, beta=self.algo.loss.beta, eps=self.algo.advantage.eps)
        batch = batch.replace(adv=adv)
        return batch, moments, token_adv_metrics(batch)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        num, _, stats = grpo_objective_parts(logp_BxS, old_logp_BxS, None, mb.adv, mb.loss_mask_BxS, self.loss,
                                             behav_logp_BxT=mb.old_logp_BxS)
        return num / dens["pg"], {"pg": stats | self.rollout_mismatch(logp_BxS, mb)}

    def finalize(self, stats):
        return finalize_objective_stats(stats["pg"])
