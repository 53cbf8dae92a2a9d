"""One module per ``algo.kind`` behind one interface (``base.Algorithm``); ``registry.ALGORITHMS`` maps the kind to
it. A new algorithm is a module here, a line in the registry, a preset and its tests."""
from grpo_jax.algorithms.base import Algorithm, Passes, Scored
from grpo_jax.algorithms.config import AlgoConfig
from grpo_jax.algorithms.registry import ALGORITHMS, algorithm_class, build_algorithm, make_algorithm

__all__ = ["ALGORITHMS", "AlgoConfig", "Algorithm", "Passes", "Scored", "algorithm_class", "build_algorithm",
           "make_algorithm"]
