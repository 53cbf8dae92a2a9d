"""One decode step of G samples per prompt over a ``GroupKVCache``: the prompt's K/V read once per group.

Attention of row b = (prompt p = b // G, sample g) for its one new token, per kv head k and query head r of the
R = N/K heads sharing it (GQA), with scores in float32 and ONE softmax over both parts of the cache::

    s_l = q·k^prompt_{p,l} / √H   (prompt slot l real)      s_j = q·k^own_{b,j} / √H   (completion slot j <= index)
    out = Σ_l softmax(s)_l v^prompt_{p,l} + Σ_j softmax(s)_j v^own_{b,j}

The prompt scores are one matmul per (prompt, kv head) of its G·R queries against its L keys, so the prompt K/V
is read once per group, not G times. The completion part reads only the blocks the decode loop has added so far
(``segment_ends``), not ``max_new_tokens`` slots. This equals ``transformer.attend`` over the prompt slots
followed by the completion slots (the same scores, one softmax), up to float rounding of the sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models.cache import GroupKVCache
from grpo_jax.models.heads import CausalLM
from grpo_jax.models.rope import inv_frequencies, rope_tables
from grpo_jax.models.transformer import decoder_layer, embed_tokens, rms_norm


def group_attention(q_BxNxH, prompt_k_PxKxLxH, prompt_v_PxKxLxH, prompt_mask_PxL, k_blocks, v_blocks,
                    index) -> jax.Array:
    """out_BxNxH: each row's one query over its prompt's real slots and its own completion slots ``0 .. index``
    (the module docstring's formula). Rows are in group order (``B = P*G``); ``k_blocks``/``v_blocks``: the
    completion slots as consecutive blocks [B, K, S_j, H]."""
    B, N, H = q_BxNxH.shape
    P, K, L, _ = prompt_k_PxKxLxH.shape
    G, R = B // P, N // K
    q_BxKxRxH = q_BxNxH.reshape(B, K, R, H)
    prompt_PxGxKxRxL = jnp.einsum("pgkrh,pklh->pgkrl", q_BxNxH.reshape(P, G, K, R, H), prompt_k_PxKxLxH,
                                  preferred_element_type=jnp.float32)
    scores, allowed, start = [prompt_PxGxKxRxL.reshape(B, K, R, L)], [jnp.repeat(prompt_mask_PxL, G, axis=0)], 0
    for k_BxKxSxH in k_blocks:
        S = k_BxKxSxH.shape[2]
        scores.append(jnp.einsum("bkrh,bksh->bkrs", q_BxKxRxH, k_BxKxSxH, preferred_element_type=jnp.float32))
        allowed.append(jnp.broadcast_to(start + jnp.arange(S) <= index, (B, S)))
        start += S
    scores_BxKxRxLS = jnp.concatenate(scores, axis=-1) * (H**-0.5)
    allowed_BxLS = jnp.concatenate(allowed, axis=1)
    scores_BxKxRxLS = jnp.where(allowed_BxLS[:, None, None], scores_BxKxRxLS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxKxRxLS, axis=-1).astype(prompt_v_PxKxLxH.dtype)
    out_PxGxKxRxH = jnp.einsum("pgkrl,pklh->pgkrh", probs[..., :L].reshape(P, G, K, R, L), prompt_v_PxKxLxH,
                               preferred_element_type=jnp.float32)
    out_BxKxRxH, start = out_PxGxKxRxH.reshape(B, K, R, H), L
    for v_BxKxSxH in v_blocks:  # the parts summed in float32, rounded once to the compute dtype
        S = v_BxKxSxH.shape[2]
        out_BxKxRxH = out_BxKxRxH + jnp.einsum("bkrs,bksh->bkrh", probs[..., start:start + S], v_BxKxSxH,
                                               preferred_element_type=jnp.float32)
        start += S
    return out_BxKxRxH.reshape(B, N, H).astype(prompt_v_PxKxLxH.dtype)


def decode_step(model: CausalLM, layers: tuple[nnx.State, ...], token_B: jax.Array,
                cache: GroupKVCache) -> tuple[jax.Array, GroupKVCache]:
    """(logits_BxV, cache): the next-token logits after ``token_B`` (one per row), whose keys and values are written
    at completion slot ``cache.index`` (in the cache's last block, which must cover it) of every layer, in place
    inside a loop; the layers unrolled in Python. ``layers``: ``model.model.split_layers()``, made once outside the
    decode loop (inside it, XLA would copy every layer's weight slice on every step)."""
    cfg = model.config
    graphdef, _ = nnx.split(model.model.layers)
    cos, sin = rope_tables(cache.positions_B[:, None], inv_frequencies(cfg), cfg.compute_dtype)
    x_Bx1xE = embed_tokens(cfg, model.model.embed, token_B[:, None])
    k_blocks, v_blocks, index = list(cache.k_blocks), list(cache.v_blocks), cache.index
    at = (0, 0, index - (cache.slots - k_blocks[0][-1].shape[2]), 0)  # the slot within the last block
    for i in range(cfg.num_layers):
        def attention(q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH, i=i):
            last_k, last_v = k_blocks[i][-1], v_blocks[i][-1]
            last_k = jax.lax.dynamic_update_slice(last_k, k_Bx1xKxH.transpose(0, 2, 1, 3).astype(last_k.dtype), at)
            last_v = jax.lax.dynamic_update_slice(last_v, v_Bx1xKxH.transpose(0, 2, 1, 3).astype(last_v.dtype), at)
            k_blocks[i], v_blocks[i] = k_blocks[i][:-1] + (last_k,), v_blocks[i][:-1] + (last_v,)
            out_BxNxH = group_attention(q_Bx1xNxH[:, 0], cache.prompt_k_PxKxLxH[i], cache.prompt_v_PxKxLxH[i],
                                        cache.prompt_mask_PxL, k_blocks[i], v_blocks[i], index)
            return out_BxNxH[:, None]

        x_Bx1xE = decoder_layer(cfg, nnx.merge(graphdef, layers[i]), x_Bx1xE, cos, sin, attention)
    hidden_BxE = rms_norm(x_Bx1xE[:, 0], model.model.norm, cfg.rms_norm_eps)
    new_cache = cache.replace(k_blocks=tuple(k_blocks), v_blocks=tuple(v_blocks), index=index + 1)
    return model.logits(hidden_BxE), new_cache


def segment_ends(steps: int, max_segments: int = 4, min_extent: int = 16) -> tuple[int, ...]:
    """Static completion-cache extents of a loop of ``steps`` decode steps: ``steps`` halved (rounding up) while the
    half is at least ``min_extent``, at most ``max_segments`` extents, e.g. 31 -> (16, 31), 511 -> (64, 128, 256,
    511). Step t writes slot t, so the segment ending at e runs steps ``< e`` with ``e`` slots in its blocks; its
    attention reads at most twice the slots written (the first segment: its whole extent). Each segment is one
    compiled copy of the decode step, hence the cap (compile time grows with it: ~0.5 s a copy for a 4-layer
    model on XLA:CPU)."""
    ends = (steps,) if steps > 0 else ()
    while ends and len(ends) < max_segments and -(-ends[0] // 2) >= min_extent:
        ends = (-(-ends[0] // 2),) + ends
    return ends
