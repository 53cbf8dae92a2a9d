"""Advantages, in one place: how rewards (and per-token terms) become the weights of the policy gradient.

- ``group``: GRPO's group-relative advantages, RLOO, cross-group (batch, running) baselines and scales
  (``AdvantageConfig``, ``compute_advantages``, ``compute_advantages_with_state``);
- ``tokens``: token-level terms on top of a sequence advantage (return-to-go, multi-scale, KL as a per-token reward);
- ``gae``: PPO's per-token rewards and generalised advantage estimation from a critic's values;
- ``stats``: the segment moments, running moments and whitening they share.
"""
from grpo_jax.advantages.gae import gae_advantages, ppo_advantages, terminal_rewards
from grpo_jax.advantages.group import (
    AdvantageConfig,
    Baseline,
    Estimator,
    NormScale,
    Scale,
    compute_advantages,
    compute_advantages_with_state,
    group_advantages,
    normalized_advantages,
    rloo_advantages,
)
from grpo_jax.advantages.stats import RunningMoments, running_moments_update, segment_moments, whiten
from grpo_jax.advantages.tokens import (
    TokenNorm,
    kl_return_to_go,
    kl_reward_advantages,
    multiscale_advantages,
    reward_to_go,
)

__all__ = [
    "AdvantageConfig", "Baseline", "Estimator", "NormScale", "RunningMoments", "Scale", "TokenNorm",
    "compute_advantages", "compute_advantages_with_state", "gae_advantages", "group_advantages",
    "kl_return_to_go", "kl_reward_advantages", "multiscale_advantages", "normalized_advantages", "ppo_advantages",
    "reward_to_go",
    "rloo_advantages", "running_moments_update", "segment_moments", "terminal_rewards", "whiten",
]
