"""Jit-compiled sampler: prefill each prompt once, broadcast its KV cache to the G samples, decode in a while_loop.

``generate`` is the host-side entry: it left-pads the ragged prompts into a bucketed ``[P, T_prompt]`` batch (few
distinct shapes -> few compilations) and calls ``sample``, the pure jitted core. Output rows are group-contiguous:
rows ``p*G .. p*G+G-1`` are the G samples of prompt p.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from grpo_jax.mesh import batch_size_multiple, shard_batch
from grpo_jax.models import CausalLM, KVCache


@struct.dataclass
class Rollout:
    prompt_BxP: jax.Array  # left-padded prompt tokens, each prompt repeated G times
    prompt_mask_BxP: jax.Array
    completion_BxT: jax.Array  # sampled tokens, pad_id after EOS
    completion_mask_BxT: jax.Array  # real completion tokens, EOS included
    logprobs_BxT: jax.Array  # log softmax(logits / temperature) of the sampled tokens (0 where masked)
    lengths_B: jax.Array  # completion lengths (EOS included)
    finished_B: jax.Array  # True if the row emitted an EOS


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Static sampling settings (part of the jit cache key)."""

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError(
                f"max_new_tokens and num_samples must be >= 1, got {self.max_new_tokens}, {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null, got {self.top_p}")


def truncate_logits(logits_BxV: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Set to -inf every logit outside the top-k set, then outside the smallest set of top-probability tokens whose
    mass reaches top_p (the token that crosses p is kept; ties at the k-th value are kept)."""
    if top_k is not None and top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None and top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        n_keep_B = jnp.sum(mass_before_BxV < top_p, axis=-1)  # >= 1 always
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def draw(probs_BxV: jax.Array, key: jax.Array) -> jax.Array:
    """One draw per row from the categorical ``probs_BxV`` by inverse transform: the first index whose cumulative
    probability exceeds u ~ U[0, total). One uniform per row instead of Gumbel-max's B x V (on CPU the random bits
    cost more than the rest of the sampling). A token of probability 0 is never drawn: its cumulative value equals
    its predecessor's, so the predecessor (or an earlier token) is always the first to exceed u."""
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = jax.random.uniform(key, (probs_BxV.shape[0], 1)) * cdf_BxV[:, -1:]
    last_B = probs_BxV.shape[-1] - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)  # rounding guard: u == total
    return jnp.minimum(jnp.sum(cdf_BxV <= u_Bx1, axis=-1), last_B)


def next_token(logits_BxV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(token_B, logprob_B): a draw from the truncated softmax(logits/T) (argmax when T = 0), and its log-prob under
    the *untruncated* softmax(logits/T) (T = 1 for greedy) — what ``token_logprobs(..., temperature=T)`` recomputes."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    scaled_BxV = logits_BxV / (cfg.temperature or 1.0)
    logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    if cfg.temperature == 0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
    elif cfg.top_k is None and cfg.top_p is None:
        token_B = draw(jnp.exp(logp_BxV), key)
    else:
        token_B = draw(jax.nn.softmax(truncate_logits(scaled_BxV, cfg.top_k, cfg.top_p), axis=-1), key)
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def sample(graphdef, state, prompt_PxL, prompt_mask_PxL, key, *, cfg: SamplingConfig):
    """Pure core: prefill ``[P, L]`` once, repeat the cache G times, decode up to ``max_new_tokens`` per row."""
    model: CausalLM = nnx.merge(graphdef, state)
    P, L = prompt_PxL.shape
    G, T = cfg.num_samples, cfg.max_new_tokens
    cache = KVCache.init(model.config, P, L + T)
    hidden_PxLxE, cache = model.hidden_states(prompt_PxL, attention_mask_BxT=prompt_mask_PxL, cache=cache)
    cache = cache.repeat(G)
    logits_BxV = jnp.repeat(model.logits(hidden_PxLxE[:, -1]), G, axis=0)  # the vocab projection of the last slot only
    layers = model.model.split_layers()  # per-layer weight slices made once, not on every decode step
    B = P * G
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, finished_B, _ = carry
        return (step < T) & ~jnp.all(finished_B)

    def body(carry):
        step, cache, logits_BxV, out, finished_B, lens_B = carry
        token_B, logp_B = next_token(logits_BxV, jax.random.fold_in(key, step), cfg)
        live_B = ~finished_B
        token_B = jnp.where(live_B, token_B, cfg.pad_id)
        tokens_BxT, logps_BxT = out
        tokens_BxT = tokens_BxT.at[:, step].set(token_B)
        logps_BxT = logps_BxT.at[:, step].set(jnp.where(live_B, logp_B, 0.0))
        lens_B = lens_B + live_B
        finished_B = finished_B | jnp.isin(token_B, eos)
        logits_Bx1xV, cache = model(token_B[:, None], cache=cache, layers=layers)
        return step + 1, cache, logits_Bx1xV[:, 0], (tokens_BxT, logps_BxT), finished_B, lens_B

    out = (jnp.full((B, T), cfg.pad_id, jnp.int32), jnp.zeros((B, T), jnp.float32))
    carry = (jnp.int32(0), cache, logits_BxV, out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    _, _, _, (tokens_BxT, logps_BxT), finished_B, lens_B = jax.lax.while_loop(cond, body, carry)
    mask_BxT = jnp.arange(T)[None, :] < lens_B[:, None]
    return Rollout(
        prompt_BxP=jnp.repeat(prompt_PxL, G, axis=0),
        prompt_mask_BxP=jnp.repeat(prompt_mask_PxL, G, axis=0),
        completion_BxT=tokens_BxT,
        completion_mask_BxT=mask_BxT,
        logprobs_BxT=logps_BxT,
        lengths_B=lens_B,
        finished_B=finished_B,
    )


def bucket(n: int, minimum: int = 8) -> int:
    """Padded size of a prompt length or prompt count: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...
    (powers of two and 1.5x powers of two; at most 1/3 padding) that is >= max(n, minimum)."""
    n = max(n, minimum, 1)
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power


def pad_prompts(prompt_tokens: Sequence[Sequence[int]], pad_id: int, num_rows: int, length: int):
    """Left-pad ragged prompts into ``[num_rows, length]`` (extra rows all padding) and their mask."""
    tokens = np.full((num_rows, length), pad_id, np.int32)
    mask = np.zeros((num_rows, length), bool)
    for i, p in enumerate(prompt_tokens):
        if len(p):
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = True
    return tokens, mask


def generate(
    model: CausalLM,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int,
    rng: jax.Array | int = 0,
    min_prompt_bucket: int = 8,
    batch_multiple: int = 1,
    mesh: Mesh | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions for each prompt (token-id lists, ragged, non-empty).

    Prompt lengths and the prompt count are padded to buckets (``bucket``: powers of two and 1.5x powers; at least
    ``min_prompt_bucket``; the count to a multiple of ``batch_multiple``, e.g. the mesh's batch shards), so a run
    compiles once per bucket. ``rng`` is a PRNG key or an int seed; the same seed gives the same output. Returns a
    ``Rollout`` with B = len(prompts) * G.

    ``mesh``: the prompt rows (padded to a multiple of its data*fsdp too) are placed split over its batch axes, so
    on a data-parallel mesh each device decodes only its rows, and with several processes each process uploads
    only its own rows; without it the prompts are replicated and every device decodes the whole batch. The samples
    are the same either way (the PRNG draws do not depend on the sharding).
    """
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("generate: prompt_tokens must be a non-empty list of non-empty token-id lists")
    vocab = model.config.vocab_size
    bad = [t for p in prompt_tokens for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"generate: prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_ids=tuple(int(e) for e in eos_ids), pad_id=pad_id,
    )
    n = len(prompt_tokens)
    if mesh is not None:
        batch_multiple = math.lcm(batch_multiple, batch_size_multiple(mesh))
    rows = -(-bucket(n, 1) // batch_multiple) * batch_multiple
    tokens, mask = pad_prompts(prompt_tokens, pad_id, rows, bucket(max(map(len, prompt_tokens)), min_prompt_bucket))
    if mesh is not None:
        tokens, mask = shard_batch((tokens, mask), mesh)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    graphdef, state = nnx.split(model)
    out = sample(graphdef, state, tokens, mask, key, cfg=cfg)
    return out if rows == n else jax.tree.map(lambda x: x[: n * num_samples], out)
