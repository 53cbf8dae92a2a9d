"""``algo.kind`` -> its algorithm: the one table a new kind is added to."""
from __future__ import annotations

from typing import TYPE_CHECKING

from grpo_jax.algorithms.base import Algorithm
from grpo_jax.algorithms.config import AlgoConfig
from grpo_jax.algorithms.dpo import DPO
from grpo_jax.algorithms.grpo import GRPO
from grpo_jax.algorithms.hybrid import Hybrid
from grpo_jax.algorithms.ppo import PPO
from grpo_jax.algorithms.reinforce_pp import ReinforcePP
from grpo_jax.losses import LossConfig

if TYPE_CHECKING:
    from grpo_jax.experiment import ExperimentConfig

ALGORITHMS: dict[str, type[Algorithm]] = {cls.kind: cls for cls in (GRPO, PPO, DPO, Hybrid, ReinforcePP)}


def algorithm_class(kind: str) -> type[Algorithm]:
    if kind not in ALGORITHMS:
        raise ValueError(f"algo.kind={kind!r} is not an algorithm; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[kind]


def make_algorithm(kind: str = "grpo", *, loss: LossConfig | None = None, group_size: int = 2, num_groups: int = 1,
                   **sections) -> Algorithm:
    """An algorithm outside a run (a notebook, a test, offline DPO): ``loss`` as the step applies it and the other
    ``AlgoConfig`` sections (``ppo=``, ``dpo=``, ``advantage=``) by keyword."""
    algo, cls = AlgoConfig(kind=kind, loss=loss or LossConfig(), **sections), algorithm_class(kind)
    return cls(algo=algo, loss=cls.step_loss(algo.loss), group_size=group_size, num_groups=num_groups)


def build_algorithm(cfg: ExperimentConfig) -> Algorithm:
    """The run's algorithm, with the settings it reads from the experiment config."""
    return algorithm_class(cfg.algo.kind).from_config(cfg)
