"""``algo:`` of an experiment: which kind of algorithm, and the settings of its loss, advantages, critic and pairs."""
from __future__ import annotations

import dataclasses

from grpo_jax.advantages import AdvantageConfig
from grpo_jax.losses import DPOConfig, LossConfig, PPOConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    """``kind`` picks the algorithm (``grpo_jax.algorithms.ALGORITHMS``): grpo (``loss`` on ``advantage``), ppo
    (``loss``'s clipped surrogate on GAE advantages from a learned value head + ``ppo``'s value loss), dpo (``dpo`` on
    online pairs), hybrid ((1-α)·GRPO + α·DPO on the same rollout batch), reinforce_pp (REINFORCE++). Sections a
    kind does not use are ignored. ``preset: NAME`` in YAML starts from ``grpo_jax.presets.PRESETS[NAME]``."""

    kind: str = "grpo"
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def __post_init__(self):
        from grpo_jax.algorithms.registry import ALGORITHMS  # the registry imports the algorithms, which import this

        if self.kind not in ALGORITHMS:
            raise ValueError(f"kind={self.kind!r} is not an algorithm; choose one of {sorted(ALGORITHMS)}")

    @classmethod
    def from_preset(cls, name: str) -> AlgoConfig:
        from grpo_jax.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()
