"""Token log-probs of a batch laid out as packed rows (``grpo_jax.layout`` plans them on the host).

A ``Plan`` holds, for each block of a micro-batch (one block per batch shard), R packed rows of L tokens and the
N (predecessor, target) pairs whose log-probs the padded [B, S] batch needs. A packed row holds several segments;
a segment is one sequence (``packed``) or one shared prefix followed by the suffixes of the rows that share it
(``shared_prompt``: a group's prompt encoded once, each completion a branch after it). Query i of a row sees key j
iff

    segment[j] == segment[i] != 0,  j <= i,  branch[j] in {0, branch[i]}

and every token carries its position in its own unpacked sequence, so each real token's hidden state equals the
padded computation's. Then ``logps_BxS[b, t] = log softmax(h[source_n] @ W / temperature)[target_n]`` with
n = ``slot_BxS[b, t]`` (slot N, one past the targets, reads 0): a slot the plan did not ask for is 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from grpo_jax.models.logprobs import gathered_logprobs
from grpo_jax.models.rope import inv_frequencies, rope_tables
from grpo_jax.models.transformer import decoder_layer, rms_norm


class Plan(struct.PyTreeNode):
    """Packed rows and the log-prob gather of one batch. X = micro_batches x blocks (in the order the train step's
    micro-batch split expects), so a micro-batch sees [blocks, R, L] rows, [blocks, N] targets and its own padded
    rows of ``slot_BxS``. Source indices are flat positions ``r * L + l`` within their block; slot indices count
    within the block of that padded row."""

    tokens_XxRxL: jax.Array  # int32 token ids (0 in padding)
    positions_XxRxL: jax.Array  # int32 RoPE position of each token in its own sequence
    segment_XxRxL: jax.Array  # int32, 0 = padding, else the segment's number within its row
    branch_XxRxL: jax.Array  # int32, 0 = shared prefix (or a whole sequence), k >= 1 = the k-th suffix of a segment
    keys_XxRxJxM: jax.Array  # int32: the key chunks each query chunk of a row attends (J = all padding)
    source_XxN: jax.Array  # int32 flat index (r * L + l) of each target's predecessor within the block
    target_XxN: jax.Array  # int32 token whose log-prob is taken
    slot_BxS: jax.Array  # int32 per padded slot: its target within the block; N = none (log-prob 0)


def chunked_attention(segment_RxL, branch_RxL, keys_RxJxM):
    """The ``attention`` callable of ``decoder_layer`` over packed rows, by chunks: the J = L / C query chunks of a
    row (C tokens each) attend only the M key chunks ``keys_RxJxM`` lists (those holding a visible key; index J is
    an appended all-padding chunk), with the module's mask rule inside them: the same softmax as over the whole row, at
    M·C instead of L keys per query. GQA, softmax in float32; a query that sees no key (padding) gets a finite,
    meaningless output."""
    R, L = segment_RxL.shape
    J, M = keys_RxJxM.shape[1:]
    C = L // J

    def by_chunks(x_RxL):  # [R, L, ...] -> the listed key chunks [R, J, M·C, ...] (chunk J: zeros)
        x = jnp.pad(x_RxL, ((0, 0), (0, C)) + ((0, 0),) * (x_RxL.ndim - 2)).reshape((R, J + 1, C) + x_RxL.shape[2:])
        return jax.vmap(lambda xr, kr: xr[kr])(x, keys_RxJxM).reshape((R, J, M * C) + x_RxL.shape[2:])

    seg_q, branch_q, col_q = (x.reshape(R, J, C, 1) for x in (segment_RxL, branch_RxL, jnp.broadcast_to(
        jnp.arange(L), (R, L))))
    seg_k, branch_k, col_k = (by_chunks(x)[:, :, None] for x in (segment_RxL, branch_RxL, jnp.broadcast_to(
        jnp.arange(L), (R, L))))
    allowed_RxJxCxMC = ((seg_q == seg_k) & (seg_k != 0) & (col_k <= col_q)
                        & ((branch_k == 0) | (branch_k == branch_q)))

    def attention(q_RxLxNxH, k_RxLxKxH, v_RxLxKxH):
        N, H = q_RxLxNxH.shape[2:]
        K = k_RxLxKxH.shape[2]
        q = q_RxLxNxH.reshape(R, J, C, K, N // K, H)
        scores = jnp.einsum("rjtkgh,rjskh->rjkgts", q, by_chunks(k_RxLxKxH), preferred_element_type=jnp.float32)
        scores = jnp.where(allowed_RxJxCxMC[:, :, None, None], scores * (H**-0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_RxLxKxH.dtype)
        return jnp.einsum("rjkgts,rjskh->rjtkgh", probs, by_chunks(v_RxLxKxH)).reshape(R, L, N, H)

    return attention


def packed_hidden(decoder, tokens_RxL, positions_RxL, segment_RxL, branch_RxL, keys_RxJxM) -> jax.Array:
    """Final normed hidden states [R, L, E] of packed rows: ``Decoder``'s no-cache forward (same scan, remat and
    unroll settings) with ``chunked_attention`` and the plan's positions."""
    cfg = decoder.config
    cos, sin = rope_tables(positions_RxL, inv_frequencies(cfg), cfg.compute_dtype)
    x_RxLxE = jnp.take(decoder.embed[...], tokens_RxL, axis=0).astype(cfg.compute_dtype)
    attention = chunked_attention(segment_RxL, branch_RxL, keys_RxJxM)
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
        plan.keys_XxRxJxM.reshape((D * R,) + plan.keys_XxRxJxM.shape[2:]))
    h_DxRLxE = hidden.reshape(D, R * L, hidden.shape[-1])
    h_DxNxE = jnp.take_along_axis(h_DxRLxE, plan.source_XxN[..., None], axis=1)
    outs = gathered_logprobs(h_DxNxE, plan.target_XxN, model.lm_head_ExV(), temperature=temperature,
                             return_entropy=return_entropy, chunk_size=chunk_size)
    B, S = plan.slot_BxS.shape
    slot_DxBS = plan.slot_BxS.reshape(D, (B // D) * S)

    def scatter(x_DxN):  # as a gather from the targets (plus a zero at N) into the padded slots
        x_DxN1 = jnp.pad(x_DxN, ((0, 0), (0, 1)))
        return jnp.take_along_axis(x_DxN1, slot_DxBS, axis=1).reshape(B, S)

    return tuple(None if x is None else scatter(x) for x in outs)
