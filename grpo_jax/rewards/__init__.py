"""Rewards: verifiers, batched shaping, reward models."""
from grpo_jax.rewards.shaping import dynamic_sampling_mask, overlong_penalty, zero_variance_fraction

__all__ = ["dynamic_sampling_mask", "overlong_penalty", "zero_variance_fraction"]
