"""Pure loss functions: per-token terms, KL estimators, aggregation, policy surrogates, the GRPO objective."""
from grpo_jax.losses.objective import LossConfig, finalize_objective_stats, grpo_objective, grpo_objective_parts
from grpo_jax.losses.policy import finalize_stats, merge_stats, policy_loss, policy_loss_terms
from grpo_jax.losses.terms import AggMode, KLKind, PolicyKind, aggregate, aggregate_parts, kl_penalty, masked_mean

__all__ = [
    "AggMode", "KLKind", "LossConfig", "PolicyKind", "aggregate", "aggregate_parts", "finalize_objective_stats",
    "finalize_stats", "grpo_objective", "grpo_objective_parts", "kl_penalty", "masked_mean", "merge_stats",
    "policy_loss", "policy_loss_terms",
]
