"""Token log-probs of a batch laid out as packed rows (``grpo_jax.layout`` plans them on the host).

A ``Plan`` holds, for each block of a micro-batch (one block per batch shard), R packed rows of L tokens and the
N (predecessor, target) pairs whose log-probs the padded [B, S] batch needs. A packed row holds several segments;
a segment is one sequence (``packed``) or one shared prefix followed by the suffixes of the rows that share it
(``shared_prompt``: a group's prompt encoded once, each completion a branch after it). Query i of a row sees key j
iff

    segment[j] == segment[i] != 0,  j <= i,  branch[j] in {0, branch[i]}

and every token carries its position in its own unpacked sequence, so each real token's hidden state equals the
padded computation's (``chunked_attention`` evaluates this rule over the key chunks the plan says can hold a visible
key, never the whole row). Then ``logps_BxS[b, t] = log softmax(h[source_n] @ W / temperature)[target_n]`` with
n = ``slot_BxS[b, t]`` (slot N, one past the targets, reads 0): a slot the plan did not ask for is 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from grpo_jax.models.logprobs import gathered_logprobs
from grpo_jax.models.rope import inv_frequencies, rope_tables
from grpo_jax.models.transformer import decoder_layer, embed_tokens, rms_norm


class Plan(struct.PyTreeNode):
    """Packed rows and the log-prob gather of one batch. X = micro_batches x blocks (in the order the train step's
    micro-batch split expects), so a micro-batch sees [blocks, R, L] rows, [blocks, N] targets and its own padded
    rows of ``slot_BxS``. Source indices are flat positions ``r * L + l`` within their block; slot indices count
    within the block of that padded row."""

    tokens_XxRxL: jax.Array  # int32 token ids (0 in padding)
    positions_XxRxL: jax.Array  # int32 RoPE position of each token in its own sequence
    segment_XxRxL: jax.Array  # int32, 0 = padding, else the segment's number within its row
    branch_XxRxL: jax.Array  # int32, 0 = shared prefix (or a whole sequence), k >= 1 = the k-th suffix of a segment
    source_XxN: jax.Array  # int32 flat index (r * L + l) of each target's predecessor within the block
    target_XxN: jax.Array  # int32 token whose log-prob is taken
    slot_BxS: jax.Array  # int32 per padded slot: its target within the block; N = none (log-prob 0)
    chunk: int = struct.field(pytree_node=False, default=32)  # attention's query/key chunk (tokens)
    global_chunks: int = struct.field(pytree_node=False, default=0)  # g: each row's first g chunks...
    window_chunks: int = struct.field(pytree_node=False, default=1)  # ...and the w chunks ending at the query's


def chunked_attention(segment_RxL, branch_RxL, C: int, g: int, w: int):
    """The ``attention`` callable of ``decoder_layer`` over packed rows, by chunks of C tokens: the queries of chunk j
    see the keys of the row's first g chunks and of chunks j-w+1 .. j (those below g or 0 once only), with the
    module's mask rule inside them. The plan guarantees (``grpo_jax.layout``: g and w from the batch's shape) that
    every visible key is there, so this is the softmax over the whole row at (g + w)·C instead of L keys per query;
    all slices are static (no gather, no scatter in the backward pass). GQA, softmax in float32; a query that sees
    no key (padding) gets a finite, meaningless output."""
    R, L = segment_RxL.shape
    J = L // C

    def keys(x_RxL):  # [R, L, ...] -> [R, J, (g + w)·C, ...]: the g first chunks, then the window
        tail = x_RxL.shape[2:]
        first = jnp.broadcast_to(x_RxL[:, None, :g * C], (R, J, g * C) + tail)
        padded = jnp.pad(x_RxL, ((0, 0), ((w - 1) * C, 0)) + ((0, 0),) * len(tail)).reshape((R, J + w - 1, C) + tail)
        window = jnp.stack([padded[:, i:i + J] for i in range(w)], axis=2).reshape((R, J, w * C) + tail)
        return jnp.concatenate([first, window], axis=2)

    col_RxL = jnp.broadcast_to(jnp.arange(L), (R, L))
    seg_q, branch_q, col_q = (x.reshape(R, J, C, 1) for x in (segment_RxL, branch_RxL, col_RxL))
    seg_k, branch_k, col_k = (keys(x)[:, :, None] for x in (segment_RxL, branch_RxL, col_RxL))
    window_chunk_JxW = jnp.arange(J)[:, None] - (w - 1) + jnp.arange(w)[None]  # below g: already among the first
    fresh = jnp.concatenate([jnp.ones((J, g * C), bool), jnp.repeat(window_chunk_JxW >= g, C, axis=1)], axis=1)
    allowed_RxJxCxK = ((seg_q == seg_k) & (seg_k != 0) & (col_k <= col_q) & fresh[None, :, None]
                       & ((branch_k == 0) | (branch_k == branch_q)))

    def attention(q_RxLxNxH, k_RxLxKxH, v_RxLxKxH):
        N, H = q_RxLxNxH.shape[2:]
        K = k_RxLxKxH.shape[2]
        q = q_RxLxNxH.reshape(R, J, C, K, N // K, H)
        scores = jnp.einsum("rjtkgh,rjskh->rjkgts", q, keys(k_RxLxKxH), preferred_element_type=jnp.float32)
        scores = jnp.where(allowed_RxJxCxK[:, :, None, None], scores * (H**-0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_RxLxKxH.dtype)
        return jnp.einsum("rjkgts,rjskh->rjtkgh", probs, keys(v_RxLxKxH)).reshape(R, L, N, H)

    return attention


def packed_hidden(decoder, tokens_RxL, positions_RxL, segment_RxL, branch_RxL, window: tuple[int, int, int]):
    """Final normed hidden states [R, L, E] of packed rows: ``Decoder``'s no-cache forward (same scan, remat and
    unroll settings) with ``chunked_attention`` (``window`` = its C, g, w) and the plan's positions."""
    cfg = decoder.config
    cos, sin = rope_tables(positions_RxL, inv_frequencies(cfg), cfg.compute_dtype)
    x_RxLxE = embed_tokens(cfg, decoder.embed, tokens_RxL)
    attention = chunked_attention(segment_RxL, branch_RxL, *window)
    graphdef, stack = nnx.split(decoder.layers)

    def body(x, layer_state):
        return decoder_layer(cfg, nnx.merge(graphdef, layer_state), x, cos, sin, attention), None

    body = jax.checkpoint(body) if cfg.remat else body
    x_RxLxE, _ = jax.lax.scan(body, x_RxLxE, stack, unroll=1 if cfg.scan_layers else cfg.num_layers)
    return rms_norm(x_RxLxE, decoder.norm, cfg.rms_norm_eps)


def plan_logprobs(model, plan: Plan, *, temperature, return_entropy: bool, chunk_size: int):
    """``token_logprobs`` of one micro-batch through its plan: ``(logps_BxS, entropy_BxS or None)`` in the padded
    layout, float32, nonzero only at the slots the plan targets (there equal to the padded computation's). The vocab
    head runs on the N gathered hidden states of each block only (chunked, ``gathered_logprobs``)."""
    D, R, L = plan.tokens_XxRxL.shape
    hidden = packed_hidden(model.model, *(x.reshape(D * R, L) for x in (
        plan.tokens_XxRxL, plan.positions_XxRxL, plan.segment_XxRxL, plan.branch_XxRxL)),
        (plan.chunk, plan.global_chunks, plan.window_chunks))
    h_DxRLxE = hidden.reshape(D, R * L, hidden.shape[-1])
    h_DxNxE = jnp.take_along_axis(h_DxRLxE, plan.source_XxN[..., None], axis=1)
    outs = gathered_logprobs(h_DxNxE, plan.target_XxN, model.lm_head_ExV(for_logprobs=True), temperature=temperature,
                             return_entropy=return_entropy, chunk_size=chunk_size)
    B, S = plan.slot_BxS.shape
    slot_DxBS = plan.slot_BxS.reshape(D, (B // D) * S)

    def scatter(x_DxN):  # as a gather from the targets (plus a zero at N) into the padded slots
        x_DxN1 = jnp.pad(x_DxN, ((0, 0), (0, 1)))
        return jnp.take_along_axis(x_DxN1, slot_DxBS, axis=1).reshape(B, S)

    return tuple(None if x is None else scatter(x) for x in outs)
