"""Rewards: the registry and built-in verifiers, group-level length penalty, frozen reward model, batched shaping,
the timeout worker pool, and ``compute_rewards`` that combines them for a rollout batch."""
from grpo_jax.rewards.combine import RewardTerm, compute_rewards, resolve_rewards, reward_table
from grpo_jax.rewards.config import OverlongConfig, RewardsConfig, RewardSpec
from grpo_jax.rewards.length import length_penalty
from grpo_jax.rewards.pool import Outcome, RewardPool
from grpo_jax.rewards.registry import get_reward, register_reward, registered_rewards
from grpo_jax.rewards.reward_model import RewardModelScorer, reward_model
from grpo_jax.rewards.shaping import overlong_penalty, zero_variance_fraction, zero_variance_mask
from grpo_jax.rewards.verifiers import answer_tag, countdown, exact_int, format_reward, last_boxed, math_verify

__all__ = [
    "OverlongConfig",
    "Outcome",
    "RewardModelScorer",
    "RewardPool",
    "RewardSpec",
    "RewardTerm",
    "RewardsConfig",
    "answer_tag",
    "compute_rewards",
    "reward_table",
    "countdown",
    "zero_variance_mask",
    "exact_int",
    "format_reward",
    "get_reward",
    "last_boxed",
    "length_penalty",
    "math_verify",
    "overlong_penalty",
    "register_reward",
    "registered_rewards",
    "resolve_rewards",
    "reward_model",
    "zero_variance_fraction",
]
