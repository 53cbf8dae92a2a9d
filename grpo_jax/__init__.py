"""grpo_jax: GRPO and its descendants, in pure JAX."""

__version__ = "0.1.0"
