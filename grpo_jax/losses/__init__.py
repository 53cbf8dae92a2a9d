"""Pure loss functions: per-token terms, KL estimators, aggregation, policy surrogates, off-policy (sampler/trainer
mismatch) correction, the GRPO objective, PPO's value loss, DPO/IPO and the GRPO+DPO hybrid. (Advantages, GAE
included, are in ``grpo_jax.advantages``.)"""
from grpo_jax.losses.dpo import (
    DPOConfig,
    DPOKind,
    dpo_loss,
    dpo_loss_parts,
    finalize_dpo_stats,
    group_preference_pairs,
    hybrid_loss,
    online_dpo_parts,
    sequence_logps,
)
from grpo_jax.losses.objective import LossConfig, finalize_objective_stats, grpo_objective, grpo_objective_parts
from grpo_jax.losses.off_policy import (
    OffPolicyConfig,
    OffPolicyLevel,
    OffPolicyReject,
    OffPolicyWeight,
    correction_terms,
    finalize_mismatch_stats,
    log_ratio_BxT,
    mismatch_stats,
)
from grpo_jax.losses.policy import finalize_stats, merge_stats, policy_loss, policy_loss_terms
from grpo_jax.losses.ppo import PPOConfig, finalize_ppo_stats, ppo_objective_parts, value_loss_terms
from grpo_jax.losses.terms import AggMode, KLKind, PolicyKind, aggregate, aggregate_parts, kl_penalty, masked_mean

__all__ = [
    "AggMode", "DPOConfig", "DPOKind", "KLKind", "LossConfig", "OffPolicyConfig", "OffPolicyLevel", "OffPolicyReject",
    "OffPolicyWeight", "PPOConfig", "PolicyKind", "aggregate", "aggregate_parts", "correction_terms", "dpo_loss",
    "dpo_loss_parts", "finalize_dpo_stats", "finalize_mismatch_stats", "finalize_objective_stats",
    "finalize_ppo_stats", "finalize_stats", "group_preference_pairs", "grpo_objective", "grpo_objective_parts",
    "hybrid_loss", "kl_penalty", "log_ratio_BxT", "masked_mean", "merge_stats", "mismatch_stats", "online_dpo_parts",
    "policy_loss", "policy_loss_terms", "ppo_objective_parts", "sequence_logps", "value_loss_terms",
]
