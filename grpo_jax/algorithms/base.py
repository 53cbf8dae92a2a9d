"""The interface every ``algo.kind`` implements, and the records it reads.

An algorithm owns four things; the loop and the train step call them and never test the kind:

1. its passes: ``needs_reference`` (the frozen reference's log-probs), ``needs_values`` (the critic's values of the
   policy before the update), ``needs_policy_logprobs`` (the trainer's own log-probs of the rollout before the
   update, for advantages built from KL(π_θ‖π_ref) rather than from the sampler's log-probs), ``prepare_policy``
   (e.g. PPO's value head) and ``stateful`` (running reward moments carried across steps and checkpointed);
2. ``assemble``: how a scored rollout (``Scored``) becomes its training ``Batch`` (advantages, GAE, pairs), with the
   host metrics of its advantages;
3. its objective, per micro-batch, as exact parts: ``forward`` (one decoder pass), ``denominators`` (from the whole
   batch), ``micro_loss`` (this micro-batch's numerators over those denominators), ``contiguous`` (micro-batches
   that must hold whole groups) and ``needs_proximal`` (π_old of a μ > 1 step is the trainer's policy at its start);
4. ``finalize``: merged micro-batch stats -> the step's metrics.

``check_config`` holds the kind's own config rules; ``grpo_jax.algorithms.registry`` maps ``algo.kind`` to the class.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.advantages import RunningMoments, compute_advantages, compute_advantages_with_state
from grpo_jax.algorithms.config import AlgoConfig
from grpo_jax.losses import LossConfig, OffPolicyConfig, aggregate_parts, mismatch_stats
from grpo_jax.models import token_logprobs
from grpo_jax.models.packed import plan_logprobs
from grpo_jax.rollout import Rollout
from grpo_jax.train_step import Batch

# compiled once per config and batch shape: eager, the estimators' segment ops cost the loop ~12 ms a step
_STATIC = ("group_size", "cfg", "num_groups")
_advantages = jax.jit(compute_advantages, static_argnames=_STATIC)
_advantages_with_state = jax.jit(compute_advantages_with_state, static_argnames=_STATIC)

if TYPE_CHECKING:
    from grpo_jax.experiment import ExperimentConfig

Stats = dict[str, dict[str, jax.Array]]
# What the mismatch metrics count as truncated (ρ > 2) and masked (ρ outside [0.5, 2]) when no correction is set.
MEASURED = OffPolicyConfig(weight="truncate", cap=2.0, reject="mask", reject_low=0.5, reject_high=2.0)
LogProbs = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens_BxS, attn_BxS) -> per-token values [B, S]


@dataclasses.dataclass(frozen=True)
class Scored:
    """A rollout and its rewards: what ``assemble`` turns into a batch. Rows are group-contiguous, or ragged
    (dynamic group size: ``group_ids_B``, rows from ``n_valid`` on are padding)."""

    rollout: Rollout
    rewards_B: np.ndarray  # [B] total reward (padding rows 0)
    keep_B: jax.Array  # rows that carry loss: real, and kept by dynamic sampling
    n_valid: int
    group_ids_B: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Passes:
    """The extra forward passes an algorithm asked for, bound to the current params by the loop."""

    reference: LogProbs | None = None  # the frozen reference's log-probs
    values: LogProbs | None = None  # the critic's values of the policy before this update
    policy: LogProbs | None = None  # the trainer's log-probs under the params before this update (not the sampler's)


def rollout_batch(scored: Scored) -> Batch:
    """The prompt+completion arrays [B, S] of a rollout; loss on the completion tokens of kept rows only. The
    advantage is left 0 and no reference is attached: ``assemble`` fills in what its algorithm needs."""
    ro = scored.rollout
    tokens = jnp.concatenate([ro.prompt_BxP, ro.completion_BxT], axis=1)
    attn = jnp.concatenate([ro.prompt_mask_BxP, ro.completion_mask_BxT], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(ro.prompt_mask_BxP),
                                 ro.completion_mask_BxT & scored.keep_B[:, None]], axis=1)
    old_logp = jnp.concatenate([jnp.zeros(ro.prompt_BxP.shape, jnp.float32), ro.logprobs_BxT], axis=1)
    return Batch(tokens_BxS=tokens, attn_mask_BxS=attn, loss_mask_BxS=loss_mask, old_logp_BxS=old_logp,
                 ref_logp_BxS=None, adv=jnp.zeros(tokens.shape[:1], jnp.float32))


def adv_metrics(adv: np.ndarray) -> dict[str, float]:
    return {"adv/mean": adv.mean(), "adv/std": adv.std(), "adv/abs_mean": np.abs(adv).mean()}


def token_adv_metrics(batch: Batch) -> dict[str, float]:
    """``adv_metrics`` over the loss tokens of a token-level advantage."""
    return adv_metrics(np.asarray(batch.adv)[np.asarray(batch.loss_mask_BxS)])


def refuse_grpo_options(kind: str, cfg: ExperimentConfig) -> None:
    """The options only ``algo.kind=grpo`` implements."""
    if cfg.train.kl_in_reward:
        raise ValueError(f"train.kl_in_reward is implemented for algo.kind=grpo only, got {kind!r}")
    if cfg.algo.advantage.token_alpha > 0:
        raise ValueError("algo.advantage.token_alpha adds the KL return-to-go to GRPO's advantages: it needs "
                         f"algo.kind=grpo (got {kind!r})")
    if cfg.rollout.dynamic_group is not None:
        raise ValueError("rollout.dynamic_group works with algo.kind=grpo (ragged groups)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm(abc.ABC):
    """Settings every kind reads: ``algo`` as configured, ``loss`` as the step applies it (``norm_len`` filled in,
    β moved into the reward by ``kl_in_reward``), the group layout and the rollout length."""

    kind: ClassVar[str]
    contiguous: ClassVar[bool] = False  # micro-batches hold whole groups (pairs are formed inside a micro-batch)
    packs: ClassVar[bool] = True  # ``forward`` follows a batch's plan (train.layout packed / shared_prompt)
    needs_values: ClassVar[bool] = False

    algo: AlgoConfig
    loss: LossConfig
    group_size: int
    num_groups: int  # prompts per step
    kl_in_reward: bool = False

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Algorithm:
        loss = cfg.algo.loss
        if loss.agg == "seq-mean-token-sum-norm" and loss.norm_len is None:
            loss = dataclasses.replace(loss, norm_len=float(cfg.rollout.max_new_tokens))
        if cfg.train.kl_in_reward:
            loss = dataclasses.replace(loss, beta=0.0)
        return cls(algo=cfg.algo, loss=cls.step_loss(loss), group_size=cfg.rollout.group_size,
                   num_groups=cfg.train.batch_prompts, kl_in_reward=cfg.train.kl_in_reward)

    @classmethod
    def step_loss(cls, loss: LossConfig) -> LossConfig:
        """The loss the step applies, from ``algo.loss`` (e.g. without the KL term when the kind puts it in the
        reward)."""
        return loss

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Raise ValueError for settings this kind cannot run (called while the experiment config is built)."""
        refuse_grpo_options(cls.kind, cfg)

    # -- passes ---------------------------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return self.algo.loss.beta > 0

    @property
    def needs_policy_logprobs(self) -> bool:
        """The advantages read the trainer's log-probs of the rollout before the update (``Passes.policy``)."""
        return False

    @property
    def stateful(self) -> bool:
        return False

    def prepare_policy(self, policy, mesh, load=None):
        """The policy with what the kind trains beside it (e.g. PPO's critic); ``load(path)`` loads an HF folder
        with the run's model settings."""
        return policy

    def critic_optim(self, optim):
        """The optimizer config of a separate critic (``make_optimizer(critic=...)``), None when there is none."""
        return None

    # -- batch ----------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def assemble(self, scored: Scored, passes: Passes, moments: RunningMoments
                 ) -> tuple[Batch, RunningMoments, dict[str, float]]:
        """(the training batch, the running moments after it, host metrics of its advantages)."""

    def sequence_advantages(self, scored: Scored, moments: RunningMoments) -> tuple[jax.Array, RunningMoments]:
        """``algo.advantage`` applied to the rewards (contiguous groups, or ragged ones), folding the batch into the
        running moments when the config uses them."""
        ragged = scored.group_ids_B is not None
        kw = dict(group_ids_B=scored.group_ids_B, num_groups=self.num_groups if ragged else None)
        rewards, group, cfg = jnp.asarray(scored.rewards_B), None if ragged else self.group_size, self.algo.advantage
        if cfg.stateful:
            return _advantages_with_state(rewards, group, cfg, moments, **kw)
        return _advantages(rewards, group, cfg, **kw), moments

    def reference(self, batch: Batch, passes: Passes) -> jax.Array | None:
        return passes.reference(batch.tokens_BxS, batch.attn_mask_BxS) if self.needs_reference else None

    def policy_logprobs(self, batch: Batch, passes: Passes) -> jax.Array | None:
        """log π_θ [B, S] of the batch under the params before the update (float32, like the reference's), when the
        algorithm needs them: the sampler's ``batch.old_logp_BxS`` may differ (bf16, top-k/top-p, staleness)."""
        if not self.needs_policy_logprobs:
            return None
        if passes.policy is None:
            raise ValueError(f"algo.kind={self.kind!r} needs the trainer's log-probs (Passes.policy), got none")
        return passes.policy(batch.tokens_BxS, batch.attn_mask_BxS)

    # -- objective ------------------------------------------------------------------------------------------------
    def forward(self, model, mb: Batch, *, temperature: float, chunk_size: int, with_entropy: bool):
        """(logp_BxS, entropy_BxS or None, values_BxS or None) from one decoder pass: over the padded rows, or
        over the packed rows of ``mb.plan`` (then 0 at the slots outside the loss mask)."""
        if mb.plan is not None:
            return plan_logprobs(model, mb.plan, temperature=temperature, return_entropy=with_entropy,
                                 chunk_size=chunk_size) + (None,)
        out = token_logprobs(model, mb.tokens_BxS, mb.attn_mask_BxS, temperature=temperature,
                             return_entropy=with_entropy, chunk_size=chunk_size)
        return (out if with_entropy else (out, None)) + (None,)

    def denominators(self, batch: Batch) -> dict[str, jax.Array]:
        """``pg``: the loss aggregation's denominator over the whole batch's loss mask (1 when it is 0: the loss is
        then 0)."""
        den = aggregate_parts(jnp.zeros(batch.loss_mask_BxS.shape), batch.loss_mask_BxS, self.loss.agg,
                              norm_len=self.loss.norm_len)[1]
        return {"pg": jnp.where(den > 0, den, 1.0)}

    def check_batch(self, rows: int, micro_batches: int) -> None:
        """Static checks of the batch layout (rows, micro-batches) at trace time."""

    @property
    def needs_proximal(self) -> bool:
        """An off-policy correction tells the sampler's log-probs (μ, ``batch.old_logp_BxS``) from the trainer's
        before the update (π_prox, π_old of the ratio), which the step then keeps for μ > 1."""
        return self.loss.off_policy is not None

    def rollout_mismatch(self, logp_BxS, mb: Batch) -> dict[str, jax.Array]:
        """``mismatch_stats`` of the trainer's log-probs (sg(logp)) against the rollout's, when no correction is set
        (its truncated/masked counts those of ``MEASURED``); with one, the objective computes them from π_prox
        (``grpo_objective_parts``). Merge-able sums, finalized by ``finalize_objective_stats``."""
        if self.loss.off_policy is not None:
            return {}
        stats = mismatch_stats(jax.lax.stop_gradient(logp_BxS), mb.old_logp_BxS, mb.loss_mask_BxS, MEASURED)
        return {k: v for k, v in stats.items() if k != "mismatch/weight_sum"}  # no weight is applied

    @abc.abstractmethod
    def micro_loss(self, logp_BxS, old_logp_BxS, values_BxS, mb: Batch, dens) -> tuple[jax.Array, Stats]:
        """(this micro-batch's share of the loss: its numerators over ``dens``, its stats groups to merge)."""

    @abc.abstractmethod
    def finalize(self, stats: Stats) -> dict[str, jax.Array]:
        """Merged stats -> the step's metrics."""

