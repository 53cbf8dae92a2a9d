"""Supervised warm start (SFT): teach a policy the answer format and some accuracy before GRPO.

Pure core: ``sft_loss`` (masked next-token NLL from chunked token log-probs) and ``make_sft_step`` (one jitted
AdamW step on the functional NNX state). Thin driver: ``run_sft`` tokenizes (prompt, target) pairs once into a
single fixed ``[N, T]`` layout (prompts left-padded to end at one column, targets right-padded after it), so every
step has the same shapes and the step compiles once; it then runs ``steps`` batches in a seeded, epoch-wise
shuffled order (``grpo_jax.data.batch_indices``) and logs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grpo_jax.data.iterator import OrderState, batch_indices
from grpo_jax.losses import aggregate
from grpo_jax.models import CausalLM, token_logprobs
from grpo_jax.optim import OptimConfig, make_optimizer, make_schedule

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """steps x batch_size sequences of at most max_len (prompt + target) tokens; AdamW with linear warmup to lr,
    then cosine decay to 0 at ``steps``; gradients clipped to global norm ``max_grad_norm``; weight decay on
    weight matrices and embeddings only (not norm scales or biases). ``optim`` is that optimizer's OptimConfig."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_len: int = 64
    log_every: int = 25

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"SFTConfig.warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SFTConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"SFTConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_len < 2:
            raise ValueError(f"SFTConfig.max_len must be >= 2 (a prompt token and a target token), got {self.max_len}")

    @property
    def optim(self) -> OptimConfig:
        """``make_optimizer(cfg.optim, cfg.steps)`` is the SFT optimizer (cosine: decays to 0 at ``steps``)."""
        return OptimConfig(lr=self.lr, schedule="cosine", warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)


class SFTBatch(NamedTuple):
    tokens_BxT: jax.Array  # int32: left-padded prompt, then the target (answer + eos), then right padding
    attn_mask_BxT: jax.Array  # bool: real tokens
    loss_mask_BxT: jax.Array  # bool: target tokens (the ones the loss predicts)


def sft_loss(model: CausalLM, tokens_BxT, attn_mask_BxT, loss_mask_BxT) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood of the target tokens:

        L = -(Σ_bt m_bt log p(x_bt | x_b,<t)) / Σ_bt m_bt,   m = loss_mask ∧ attn_mask ∧ (token t-1 is real)

    (``aggregate(..., "token-mean")``: every target token weighs the same). A token without a real predecessor
    cannot be predicted and is never counted. Log-probs come from ``token_logprobs`` (vocab projection chunked,
    no float32 [B, T, V] logits). Returns ``(loss, {"loss", "target_tokens"})``; 0 when no token is a target.
    """
    tokens_BxT = jnp.asarray(tokens_BxT)
    attn_BxT = jnp.asarray(attn_mask_BxT).astype(bool)
    loss_mask_BxT = jnp.asarray(loss_mask_BxT)
    if loss_mask_BxT.shape != tokens_BxT.shape or attn_BxT.shape != tokens_BxT.shape:
        raise ValueError(
            f"sft_loss: attn_mask_BxT {attn_BxT.shape} and loss_mask_BxT {loss_mask_BxT.shape} must have "
            f"tokens_BxT's shape {tokens_BxT.shape}"
        )
    logps_BxT = token_logprobs(model, tokens_BxT, attn_BxT)
    predictable_BxT = jnp.pad(attn_BxT[:, 1:] & attn_BxT[:, :-1], ((0, 0), (1, 0)))
    mask_BxT = loss_mask_BxT.astype(bool) & predictable_BxT
    loss = aggregate(-logps_BxT, mask_BxT, "token-mean")
    return loss, {"loss": loss, "target_tokens": jnp.sum(mask_BxT, dtype=jnp.int32)}


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted ``(params, opt_state, batch: SFTBatch) -> (params, opt_state, metrics)``; params = ``nnx.split``'s
    state of a CausalLM. Metrics: loss, target_tokens, grad_norm (before clipping). Params and optimizer state are
    donated (updated in place where the backend allows)."""

    def step(params, opt_state, batch: SFTBatch):
        def loss_fn(p):
            return sft_loss(nnx.merge(graphdef, p), *batch)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics | {"grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def encode_pairs(tokenizer, examples: Sequence[dict], completion_fn: Callable[[dict], str], max_len: int) -> SFTBatch:
    """All examples as one ``[N, P + C]`` numpy SFTBatch: prompt ``example["prompt"]`` left-padded to end at column
    P (the longest prompt), target ``completion_fn(example)`` + eos from column P, right-padded to the longest
    target C. Prompt and target are tokenized separately (no special tokens added), as a rollout would see them."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError("run_sft: the tokenizer has no eos_token_id; targets must end with eos")
    pad = eos if pad is None else pad
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([completion_fn(ex) for ex in examples], add_special_tokens=False)["input_ids"]
    targets = [t + [eos] for t in targets]
    if not all(prompts):
        raise ValueError(f"run_sft: example {[len(p) for p in prompts].index(0)} has an empty prompt")
    P, C = max(map(len, prompts)), max(map(len, targets))
    if P + C > max_len:
        raise ValueError(f"SFTConfig.max_len={max_len} is too small: the longest prompt ({P} tokens) plus the "
                         f"longest target with eos ({C}) need {P + C}")
    N = len(examples)
    tokens = np.full((N, P + C), pad, np.int32)
    attn, target = np.zeros((N, P + C), bool), np.zeros((N, P + C), bool)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        tokens[i, P - len(p) : P], tokens[i, P : P + len(t)] = p, t
        attn[i, P - len(p) : P + len(t)] = True
        target[i, P : P + len(t)] = True
    return SFTBatch(tokens, attn, target)


def run_sft(
    model: CausalLM, tokenizer, examples: Sequence[dict], cfg: SFTConfig, *, completion_fn: Callable[[dict], str]
) -> tuple[CausalLM, list[dict[str, Any]]]:
    """Train ``model`` for ``cfg.steps`` steps on (``example["prompt"]``, ``completion_fn(example)`` + eos) pairs.

    ``example["prompt"]`` is the already templated prompt (``build_splits`` adds it); ``completion_fn`` gives the
    target text in whatever form the reward expects (e.g. ``lambda ex: f"<answer>{ex['answer']}</answer>"``).
    Returns the trained model (a new object; ``model`` is not modified) and one metrics dict per step: step, loss,
    grad_norm, lr, target_tokens, seconds, tokens_per_s (real prompt + target tokens per second of that step;
    step 1 includes compilation).
    """
    if not examples:
        raise ValueError("run_sft: examples is empty")
    missing = [i for i, ex in enumerate(examples) if "prompt" not in ex]
    if missing:
        raise ValueError(f"run_sft: example {missing[0]} has no 'prompt'; render prompts first (build_splits does)")
    data = encode_pairs(tokenizer, examples, completion_fn, cfg.max_len)
    graphdef, stored = nnx.split(model, nnx.Param)
    # a float32 working copy: the step donates its params (the caller's model keeps its own), and the updates of
    # lower-precision params accumulate in float32 (their master weights) until they are rounded back at the end
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), stored)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    opt_state = optimizer.init(params)
    schedule = make_schedule(cfg.optim, cfg.steps)
    step_fn = make_sft_step(graphdef, optimizer)
    order, history = OrderState(), []
    log.info("sft: %d examples, %d steps x %d sequences of %d tokens", len(examples), cfg.steps, cfg.batch_size,
             data.tokens_BxT.shape[1])
    for step in range(1, cfg.steps + 1):
        idx, order = batch_indices(order, num_examples=len(examples), batch_size=cfg.batch_size, seed=cfg.seed)
        batch = SFTBatch(*(jnp.asarray(x[idx]) for x in data))
        start = time.perf_counter()
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - start
        history.append(metrics | {
            "step": step, "lr": float(schedule(step - 1)), "seconds": seconds,
            "tokens_per_s": int(data.attn_mask_BxT[idx].sum()) / seconds,
        })
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("sft step %d/%d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s", step, cfg.steps, metrics["loss"],
                     metrics["grad_norm"], history[-1]["lr"], history[-1]["tokens_per_s"])
    return nnx.merge(graphdef, jax.tree.map(lambda p, x: p.astype(x.dtype), params, stored)), history
