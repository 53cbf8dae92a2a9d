"""Offline DPO on a preference dataset (jsonl rows ``{"prompt", "chosen", "rejected"}``), with the same train step.

A pair is laid out as a group of 2 rollouts: rows (chosen, rejected) next to each other with rewards (1, 0), so
``train_step``'s ``kind="dpo"`` objective with ``group_size=2`` (``group_preference_pairs`` picks row 0 as chosen
and row 1 as rejected) computes exactly ``dpo_loss`` over the dataset's pairs, micro-batched exactly. The frozen
reference is a copy of the initial policy. Prompts are used as given (already templated).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import storage
from grpo_jax.algorithms import make_algorithm
from grpo_jax.data.iterator import OrderState, batch_indices
from grpo_jax.losses import DPOConfig, LossConfig
from grpo_jax.models import CausalLM, token_logprobs
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.sft import encode_pairs
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step

log = logging.getLogger(__name__)
PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineDPOConfig:
    """``steps`` updates of ``batch_pairs`` pairs (seeded epoch-wise shuffle), sequences of at most ``max_len``."""

    steps: int = 100
    batch_pairs: int = 8
    micro_batches: int = 1
    seed: int = 0
    max_len: int = 512
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        for name in ("steps", "batch_pairs", "micro_batches", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_pairs % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} must divide batch_pairs={self.batch_pairs}")


def load_preference_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a jsonl file, each with string fields prompt, chosen and rejected (other fields are kept)."""
    rows = []
    for i, line in enumerate(storage.location(path).read_text().splitlines(), 1):  # local or gs://
        if not line.strip():
            continue
        row = json.loads(line)
        bad = [k for k in PAIR_KEYS if not isinstance(row.get(k), str)]
        if bad:
            raise ValueError(f"{path}:{i}: field {bad[0]!r} must be a string; a pair needs {list(PAIR_KEYS)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def encode_preference_pairs(tokenizer, pairs: Sequence[dict], max_len: int):
    """(tokens, attn, loss_mask) numpy arrays [2N, P + C], rows 2p (chosen + eos) and 2p+1 (rejected + eos) of pair
    p; the loss mask covers the completion tokens (``sft.encode_pairs``'s layout)."""
    rows = [{"prompt": p["prompt"], "target": p[k]} for p in pairs for k in ("chosen", "rejected")]
    return encode_pairs(tokenizer, rows, lambda ex: ex["target"], max_len)


def run_offline_dpo(
    model: CausalLM, tokenizer, pairs: Sequence[dict], cfg: OfflineDPOConfig
) -> tuple[CausalLM, list[dict[str, Any]]]:
    """Train ``model`` with ``dpo_loss`` (settings ``cfg.dpo``) against a frozen copy of itself. Returns the trained
    model (a new object) and one metrics dict per step (loss, dpo_reward_accuracy, dpo_reward_margin, grad_norm...)."""
    tokens, attn, loss_mask = encode_preference_pairs(tokenizer, pairs, cfg.max_len)
    rewards = np.tile(np.array([1.0, 0.0], np.float32), len(pairs))
    graphdef, params = nnx.split(model)
    ref_params = jax.tree.map(jnp.copy, params)  # the step donates the policy's buffers
    ref_logprobs = jax.jit(lambda p, t, m: token_logprobs(nnx.merge(graphdef, p), t, m))
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    step_cfg = StepConfig(micro_batches=cfg.micro_batches, log_entropy=False)
    state = init_train_state(params, optimizer)
    objective = make_algorithm("dpo", loss=LossConfig(beta=0.0), dpo=cfg.dpo, group_size=2, num_groups=cfg.batch_pairs)
    train_step = make_train_step(graphdef, optimizer, step_cfg, objective)
    order, history = OrderState(), []
    for step in range(1, cfg.steps + 1):
        idx, order = batch_indices(order, num_examples=len(pairs), batch_size=cfg.batch_pairs, seed=cfg.seed)
        rows = np.stack([2 * np.asarray(idx), 2 * np.asarray(idx) + 1], axis=1).reshape(-1)  # pairs stay adjacent
        t, a, m = (jnp.asarray(x[rows]) for x in (tokens, attn, loss_mask))
        batch = Batch(tokens_BxS=t, attn_mask_BxS=a, loss_mask_BxS=m, old_logp_BxS=jnp.zeros(t.shape, jnp.float32),
                      ref_logp_BxS=ref_logprobs(ref_params, t, a), adv=jnp.zeros(t.shape[:1], jnp.float32),
                      rewards_B=jnp.asarray(rewards[rows]))
        state, metrics = train_step(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()} | {"step": step})
        log.info("dpo step %d/%d loss %.4f accuracy %.2f", step, cfg.steps, history[-1]["loss"],
                 history[-1]["dpo_reward_accuracy"])
    return nnx.merge(graphdef, state.params), history
