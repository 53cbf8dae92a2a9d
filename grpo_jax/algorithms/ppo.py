"""PPO with a learned critic (Schulman et al. 2017; the RLHF form of Ouyang et al. 2022): a value head on the policy's
own backbone or a separate value model (``algo.ppo.critic``, ``grpo_jax.critic``), the sequence reward on each
row's last completion token, GAE advantages and
returns from the critic's values before the update (``grpo_jax.advantages.gae``), and

    L = (num_pg + c_v·num_vf) / den_pg       (``ppo_objective_parts``: clipped surrogate + β·KL + clipped value loss)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from grpo_jax.advantages import ppo_advantages
from grpo_jax.algorithms.base import Algorithm, Passes, Scored, rollout_batch, token_adv_metrics
from grpo_jax.critic import add_critic_model, add_value_head, logprobs_and_values
from grpo_jax.losses import PPOConfig, finalize_ppo_stats, ppo_objective_parts
from grpo_jax.train_step import Batch


@functools.partial(jax.jit, static_argnames="cfg")
def _gae(rewards_B, values_BxS, mask_BxS, cfg: PPOConfig):
    return ppo_advantages(rewards_B, values_BxS, mask_BxS, cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPO(Algorithm):
    kind = "ppo"
    needs_values = True
    packs = False  # the value head reads the padded rows' hidden states (``logprobs_and_values``)

    def prepare_policy(self, policy, mesh, load=None):
        ppo = self.algo.ppo
        if ppo.critic == "head":
            return add_value_head(policy, mesh)
        return add_critic_model(policy, mesh, None if ppo.critic_path is None else load(ppo.critic_path))

    def critic_optim(self, optim):
        if self.algo.ppo.critic == "head":
            return None
        return optim if self.algo.ppo.critic_lr is None else dataclasses.replace(optim, lr=self.algo.ppo.critic_lr)

    def assemble(self, scored: Scored, passes: Passes, moments):
        """Old values V_old = the critic before the update (like the old log-probs), token-level GAE advantages
        and returns over the loss mask."""
        batch = rollout_batch(scored)
        batch = batch.replace(ref_logp_BxS=self.reference(batch, passes))
        old_BxS = passes.values(batch.tokens_BxS, batch.attn_mask_BxS)
        adv_BxS, returns_BxS = _gae(jnp.asarray(scored.rewards_B, jnp.float32), old_BxS, batch.loss_mask_BxS,
                                    self.algo.ppo)
        batch = batch.replace(adv=adv_BxS, old_values_BxS=old_BxS, returns_BxS=returns_BxS)
        return batch, moments, token_adv_metrics(batch)

    def forward(self, model, mb: Batch, *, temperature: float, chunk_size: int, with_entropy: bool):
        return logprobs_and_values(model, mb.tokens_BxS, mb.attn_mask_BxS, temperature=temperature,
                                   return_entropy=with_entropy, chunk_size=chunk_size)

    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens):
        num, _, stats = ppo_objective_parts(logp_BxS, old_logp_BxS, mb.ref_logp_BxS, mb.adv, values_BxS,
                                            mb.old_values_BxS, mb.returns_BxS, mb.loss_mask_BxS, self.loss,
                                            self.algo.ppo, behav_logp_BxT=mb.old_logp_BxS)
        return num / dens["pg"], {"pg": stats | self.rollout_mismatch(logp_BxS, mb)}

    def finalize(self, stats):
        return finalize_ppo_stats(stats["pg"])
