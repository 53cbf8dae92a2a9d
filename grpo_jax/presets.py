"""Named algorithm presets: an ``AlgoConfig`` (loss + advantage settings) per published variant.

In YAML, ``algo: {preset: dapo, loss: {beta: 0.01}}`` starts from the preset and overrides the keys given.
In Python, ``presets.dapo()`` or ``AlgoConfig.from_preset("dapo")``. Rollout-side parts of a recipe (DAPO's
dynamic sampling and overlong shaping) are separate switches, named in each docstring.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from grpo_jax.advantages import AdvantageConfig
from grpo_jax.algorithms.config import AlgoConfig
from grpo_jax.losses import DPOConfig, LossConfig, PPOConfig


def grpo() -> AlgoConfig:
    """GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300):
    A_i = (r_i - mean_G)/(std_G + ε);
    L = (1/B) Σ_i (1/|o_i|) Σ_t [-min(ρ_it A_i, clip(ρ_it, 0.8, 1.2) A_i) + 0.04·k3_it].
    """
    return AlgoConfig(
        loss=LossConfig(kind="grpo", clip_low=0.2, agg="seq-mean-token-mean", beta=0.04, kl_kind="k3"),
        advantage=AdvantageConfig(scale="group"),
    )


def dr_grpo() -> AlgoConfig:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783): no std division
    (difficulty bias) and a constant length norm instead of 1/|o_i| (length bias), no KL:
    A_i = r_i - mean_G;  L = (1/(B·L_max)) Σ_i Σ_t -min(ρ_it A_i, clip(ρ_it, 0.8, 1.2) A_i),
    with L_max = loss.norm_len (the trainer fills in max_new_tokens when it is null).
    """
    return AlgoConfig(
        loss=LossConfig(kind="grpo", clip_low=0.2, agg="seq-mean-token-sum-norm", beta=0.0),
        advantage=AdvantageConfig(scale="none"),
    )


def dapo() -> AlgoConfig:
    """DAPO (Yu et al. 2025, arXiv:2503.14476): clip-higher (ε_lo=0.2, ε_hi=0.28), token-level loss, no KL:
    L = (1/Σ_i|o_i|) Σ_i Σ_t -min(ρ_it A_i, clip(ρ_it, 0.8, 1.28) A_i), A_i group-normalised.
    The recipe's other two parts live on the rollout side: overlong reward shaping
    (``grpo_jax.rewards.overlong_penalty``) and dynamic sampling (``train.dynamic_sampling``: generate more groups
    until the batch holds ``batch_prompts`` groups whose rewards differ, ``grpo_jax.sampling.refill``).
    """
    return AlgoConfig(
        loss=LossConfig(kind="grpo", clip_low=0.2, clip_high=0.28, agg="token-mean", beta=0.0),
        advantage=AdvantageConfig(scale="group"),
    )


def bnpo() -> AlgoConfig:
    """TRL's ``loss_type="bnpo"``: GRPO with the loss averaged over all valid tokens of the local batch,
    L = (1/Σ_i|o_i|) Σ_i Σ_t [ℓ^clip_it + 0.04·k3_it]. Here gradient accumulation is exact, so "the local batch" is the
    whole optimizer batch and this equals token-mean aggregation. Not to be confused with BNPO, "Beta Normalization
    Policy Optimization" (Xiao et al. 2025, arXiv:2506.02864), which normalises rewards with a Beta distribution.
    """
    return AlgoConfig(
        loss=LossConfig(kind="grpo", clip_low=0.2, agg="token-mean", beta=0.04, kl_kind="k3"),
        advantage=AdvantageConfig(scale="group"),
    )


def gspo() -> AlgoConfig:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071): the length-normalised
    sequence ratio s_i = exp((1/|o_i|) Σ_t (logp_it - old_it)) is clipped to [1-3e-4, 1+4e-4]:
    L = (1/B) Σ_i -min(s_i A_i, clip(s_i, 1-3e-4, 1+4e-4) A_i)  (GSPO-token form, equal gradients), no KL.
    """
    return AlgoConfig(
        loss=LossConfig(kind="gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean", beta=0.0),
        advantage=AdvantageConfig(scale="group"),
    )


def cispo() -> AlgoConfig:
    """CISPO (MiniMax-M1, arXiv:2506.13585): clip the importance weight, not the update, so every token keeps a
    gradient; no lower bound (ε_lo = 1), ε_hi = 0.28 (the paper tunes only ε_hi), token-level, no KL:
    L = -(1/Σ_i|o_i|) Σ_i Σ_t sg(clip(ρ_it, 0, 1.28)) A_i log π_θ(o_it).
    """
    return AlgoConfig(
        loss=LossConfig(kind="cispo", clip_low=1.0, clip_high=0.28, agg="token-mean", beta=0.0),
        advantage=AdvantageConfig(scale="group"),
    )


def ppo() -> AlgoConfig:
    """PPO with a learned critic (Schulman et al. 2017, arXiv:1707.06347; the RLHF form of Ouyang et al. 2022): a
    value head V on the policy's last hidden states, terminal reward r_i on the last completion token, GAE
    (Schulman et al. 2016, arXiv:1506.02438) with γ = 1, λ = 0.95, advantages whitened over the batch's tokens:
    δ_t = ρ_t + γV_{t+1} - V_t,  A_t = δ_t + γλA_{t+1},  R_t = A_t + V_t(old);
    L = (1/Σ_i|o_i|) Σ_i Σ_t [-min(ρ_it A_it, clip(ρ_it, 0.8, 1.2) A_it) + 0.1·½max((V_it-R_it)², (V^clip_it-R_it)²)]
    with V^clip = V_old + clip(V - V_old, -0.2, 0.2), no KL term.
    """
    return AlgoConfig(
        kind="ppo",
        loss=LossConfig(kind="grpo", clip_low=0.2, agg="token-mean", beta=0.0),
        ppo=PPOConfig(gamma=1.0, lam=0.95, vf_coef=0.1, value_clip=0.2, whiten_advantages=True),
    )


def dpo() -> AlgoConfig:
    """Online DPO (Rafailov et al. 2023, arXiv:2305.18290; online pairs as in Guo et al. 2024, arXiv:2402.04792):
    per rollout group the best response is chosen (c) and the worst rejected (r), groups with equal rewards are
    skipped, and with h_p = (log π_θ(c_p) - log π_ref(c_p)) - (log π_θ(r_p) - log π_ref(r_p)):
    L = -(1/|P|) Σ_p log σ(0.1·h_p). The reference model is required (the initial policy by default).
    """
    return AlgoConfig(kind="dpo", loss=LossConfig(beta=0.0), dpo=DPOConfig(beta=0.1))


def hybrid() -> AlgoConfig:
    """GRPO+DPO hybrid on the same rollout batch: L = (1-α)·L_GRPO + α·L_DPO with α = 0.5, L_GRPO the ``grpo``
    preset's objective (Shao et al. 2024, arXiv:2402.03300: group-normalised advantages, clip 0.2, 0.04·k3 KL) and
    L_DPO the ``dpo`` preset's online-pairs loss (Rafailov et al. 2023, arXiv:2305.18290, β = 0.1). The weighted
    sum is this codebase's combination, not a published recipe; see ``grpo_jax.losses.hybrid_loss``.
    """
    base = grpo()
    return dataclasses.replace(base, kind="hybrid", dpo=DPOConfig(beta=0.1, alpha=0.5))


def reinforce_pp() -> AlgoConfig:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): no critic and no per-prompt baseline; the KL is a per-token
    reward, the advantage is the return-to-go normalised over the whole batch's tokens, token-level clipped loss:
    ρ_it = r_i·[t = last] - 0.01·(old_it - ref_it),  A_it = (Σ_{t'>=t} ρ_it' - mean_B) / std_B;
    L = (1/Σ_i|o_i|) Σ_i Σ_t -min(ρ'_it A_it, clip(ρ'_it, 0.8, 1.2) A_it), ρ' the policy ratio.
    """
    return AlgoConfig(kind="reinforce_pp", loss=LossConfig(kind="grpo", clip_low=0.2, agg="token-mean", beta=0.01))


PRESETS: dict[str, Callable[[], AlgoConfig]] = {
    f.__name__: f for f in (grpo, dr_grpo, dapo, bnpo, gspo, cispo, ppo, dpo, hybrid, reinforce_pp)
}
