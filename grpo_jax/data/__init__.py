"""Data: task builders (arith, countdown, gsm8k, math), loading through ``datasets``, prompt templating, a local
character tokenizer and a deterministic, exactly resumable example order."""
from grpo_jax.data.char_tokenizer import build_char_tokenizer
from grpo_jax.data.config import DataConfig
from grpo_jax.data.iterator import OrderState, batch_at, batch_indices, epoch_permutation
from grpo_jax.data.loading import load_rows, select_columns
from grpo_jax.data.synthetic import arith_examples, countdown_examples
from grpo_jax.data.tasks import Splits, build_splits, get_task, register_task
from grpo_jax.data.templating import render_prompt

__all__ = [
    "DataConfig",
    "OrderState",
    "Splits",
    "arith_examples",
    "batch_at",
    "batch_indices",
    "build_char_tokenizer",
    "build_splits",
    "countdown_examples",
    "epoch_permutation",
    "get_task",
    "load_rows",
    "register_task",
    "render_prompt",
    "select_columns",
]
