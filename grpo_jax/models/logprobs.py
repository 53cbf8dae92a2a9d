"""Token log-probs (and entropies) from hidden states, vocab projection chunked over the sequence."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.mesh import vocab_rows, vocab_split
from grpo_jax.models.heads import CausalLM


def _chunk_stats(h_BxCxE, targets_BxC, w_ExV, inv_temperature, return_entropy):
    """float32 log p(target) and entropy of softmax(h @ w / temperature) for one chunk of positions."""
    B, C, E = h_BxCxE.shape  # one 2-D matmul: XLA:CPU's backward of the 3-D einsum is several times slower
    h_RxE = vocab_rows(h_BxCxE.reshape(B * C, E), w_ExV)  # and its cotangent; never the batch's logits gathered
    logits_BxCxV = jnp.matmul(h_RxE, w_ExV, preferred_element_type=jnp.float32).reshape(B, C, -1)
    logits_BxCxV = logits_BxCxV * inv_temperature
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    if vocab_split(w_ExV):  # a gather's backward would scatter into the whole vocabulary; a masked sum partitions
        is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
        target_BxC = jnp.sum(jnp.where(is_target_BxCxV, logits_BxCxV, 0.0), axis=-1)  # exact: one term
    else:  # no [B, C, V] buffer beside the logits
        target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    logps_BxC = target_BxC - lse_BxC
    if not return_entropy:
        return logps_BxC, None
    probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    return logps_BxC, lse_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)


def token_logprobs(
    model: CausalLM,
    tokens_BxT,
    mask_BxT,
    *,
    temperature: float | jax.Array = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 128,
    positions_BxT=None,
):
    """Next-token log-probs under softmax(logits / temperature), never materialising float32 [B, T, V] logits.

    ``logps_BxT[b, t] = log softmax(logits[b, t-1] / temperature)[tokens[b, t]]`` for t >= 1 where both token t and
    token t-1 are real (``mask_BxT`` = attention mask, 1 = real, left padding allowed); 0 elsewhere (so t = 0 and
    each row's first real token are 0). With ``return_entropy`` also ``entropy_BxT[b, t]`` = entropy of that same
    distribution (same zeros); returns ``(logps_BxT, entropy_BxT)``, both float32.

    The decoder runs once to hidden states [B, T, E] (compute dtype); the projection to the vocab runs over
    ceil((T-1) / chunk_size) chunks of positions under ``jax.lax.map`` with each chunk rematerialised in the
    backward pass (``jax.checkpoint``). Peak memory of the head, forward or backward:
        B * chunk_size * V * 4 bytes                  (one chunk of float32 logits)
      + B * chunk_size * V * 4 bytes more with return_entropy (the chunk's probabilities)
    on top of the decoder's own activations, instead of B * T * V * 4.
    """
    tokens_BxT = jnp.asarray(tokens_BxT)
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
        raise ValueError(f"tokens_BxT must be a 2-D integer array, got {tokens_BxT.dtype}{list(tokens_BxT.shape)}")
    if mask_BxT.shape != tokens_BxT.shape:
        raise ValueError(f"mask_BxT has shape {mask_BxT.shape}, expected tokens' shape {tokens_BxT.shape}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden_BxTxE = model.hidden_states(tokens_BxT, positions_BxT, mask_BxT)
    return logprobs_from_hidden(hidden_BxTxE, tokens_BxT, mask_BxT, model.lm_head_ExV(for_logprobs=True),
                                temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)


def logprobs_from_hidden(hidden_BxTxE, tokens_BxT, mask_BxT, w_ExV, *, temperature, return_entropy, chunk_size):
    """``token_logprobs`` from the decoder's final hidden states and the output projection ``w_ExV`` (so a caller
    that also needs the hidden states, e.g. a value head, runs the decoder once)."""
    out = gathered_logprobs(hidden_BxTxE[:, :-1], tokens_BxT[:, 1:], w_ExV, temperature=temperature,
                            return_entropy=return_entropy, chunk_size=chunk_size)
    valid_BxT = jnp.pad(mask_BxT[:, 1:] & mask_BxT[:, :-1], ((0, 0), (1, 0)))

    def unshift(x_BxN):
        return jnp.where(valid_BxT, jnp.pad(x_BxN, ((0, 0), (1, 0))), 0.0)

    return (unshift(out[0]), unshift(out[1])) if return_entropy else unshift(out[0])


def gathered_logprobs(h_BxNxE, targets_BxN, w_ExV, *, temperature, return_entropy, chunk_size):
    """``(logps_BxN, entropy_BxN or None)``, float32: log softmax(h[b, n] @ w / temperature)[targets[b, n]] and that
    distribution's entropy, for N hidden states per row (each the predecessor of its target token). The vocab
    projection runs over ceil(N / chunk_size) chunks under ``jax.lax.map``, each rematerialised in the backward pass,
    so one chunk's float32 logits [B, chunk_size, V] are live at a time."""
    B, n = targets_BxN.shape
    chunk = min(chunk_size, max(n, 1))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_NxBxCxE = jnp.pad(h_BxNxE, ((0, 0), (0, pad), (0, 0)))
    h_NxBxCxE = h_NxBxCxE.reshape(B, n_chunks, chunk, -1).transpose(1, 0, 2, 3)
    targets_NxBxC = jnp.pad(targets_BxN, ((0, 0), (0, pad))).reshape(B, n_chunks, chunk).transpose(1, 0, 2)
    inv_temperature = 1.0 / jnp.asarray(temperature, jnp.float32)

    @jax.checkpoint
    def stats(xs):
        return _chunk_stats(*xs, w_ExV, inv_temperature, return_entropy)

    logps_NxBxC, entropy_NxBxC = jax.lax.map(stats, (h_NxBxCxE, targets_NxBxC))

    def unchunk(x_NxBxC):
        return x_NxBxC.transpose(1, 0, 2).reshape(B, n_chunks * chunk)[:, :n]

    return unchunk(logps_NxBxC), None if entropy_NxBxC is None else unchunk(entropy_NxBxC)
