"""Decoder-only transformer in Flax NNX for Qwen2/2.5, Qwen3 and Llama-3 (one implementation, config flags).

Pre-norm blocks: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate(x)) * up(x)), RMSNorm before each and at the
end; GQA; optional q/k/v/o/MLP biases and Qwen3 q/k norms. All layers live in one ``LayerStack`` whose params have a
leading 'layers' axis and run under ``jax.lax.scan``, so compile time does not grow with depth (``scan_layers=False``
unrolls that scan: faster steps on XLA:CPU, compile time linear in depth). Every param carries
its logical axis names in ``out_sharding`` metadata (names from ``grpo_jax.mesh.LOGICAL_AXIS_RULES``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.mesh import constrain_batch
from grpo_jax.models.cache import KVCache
from grpo_jax.models.config import LORA_TARGETS, ModelConfig
from grpo_jax.models.lora import adapter, add_adapter_params
from grpo_jax.models.rope import apply_rope, inv_frequencies, rope_tables

INIT_STDDEV = 0.02  # transformers' initializer_range default


def init_param(rngs: nnx.Rngs, cfg: ModelConfig, axes: tuple[str, ...], shape: tuple[int, ...], init: str) -> nnx.Param:
    if init == "normal":
        value = INIT_STDDEV * jax.random.normal(rngs.params(), shape, cfg.params_dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, cfg.params_dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rms_norm(x: jax.Array, scale: nnx.Param, eps: float) -> jax.Array:
    """x / rms(x) in float32, cast back to x's dtype, times the learned scale (transformers' order of casts)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale[...].astype(x.dtype)


class LayerStack(nnx.Module):
    """Params of all decoder layers, each with a leading [L] axis. HF layer i is index i of every param."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, E, F, N, K, H = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
                            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

        def p(axes_, shape, init="normal"):
            return init_param(rngs, cfg, ("layers",) + axes_, (L,) + shape, init)

        self.attn_norm = p(("norm",), (E,), "ones")
        self.q = p(("embed", "heads", "head_dim"), (E, N, H))
        self.k = p(("embed", "kv_heads", "head_dim"), (E, K, H))
        self.v = p(("embed", "kv_heads", "head_dim"), (E, K, H))
        self.o = p(("heads", "head_dim", "embed"), (N, H, E))
        self.q_bias = p(("heads", "head_dim"), (N, H), "zeros") if cfg.qkv_bias else None
        self.k_bias = p(("kv_heads", "head_dim"), (K, H), "zeros") if cfg.qkv_bias else None
        self.v_bias = p(("kv_heads", "head_dim"), (K, H), "zeros") if cfg.qkv_bias else None
        self.o_bias = p(("embed",), (E,), "zeros") if cfg.o_bias else None
        self.q_norm = p(("norm",), (H,), "ones") if cfg.qk_norm else None
        self.k_norm = p(("norm",), (H,), "ones") if cfg.qk_norm else None
        self.mlp_norm = p(("norm",), (E,), "ones")
        self.gate = p(("embed", "mlp"), (E, F))
        self.up = p(("embed", "mlp"), (E, F))
        self.down = p(("mlp", "embed"), (F, E))
        self.gate_bias = p(("mlp",), (F,), "zeros") if cfg.mlp_bias else None
        self.up_bias = p(("mlp",), (F,), "zeros") if cfg.mlp_bias else None
        self.down_bias = p(("embed",), (E,), "zeros") if cfg.mlp_bias else None
        if cfg.lora is not None:
            axes = {name: getattr(self, name).out_sharding for name in LORA_TARGETS}
            add_adapter_params(self, cfg.lora, axes, rngs)


def _dense(x: jax.Array, w: nnx.Param, n_in: int, bias: nnx.Param | None, lora=None) -> jax.Array:
    """A projection: x's trailing ``n_in`` dims contracted with w's leading ones, y = x·w (+ bias), computed as one
    2-D matmul [rows, in] @ [in, out]. (The same contraction as a 3-D/4-D einsum has a backward several times slower
    on XLA:CPU; ``shared/perf/NOTES.md``.) ``lora`` = (A, B, scale) adds scale·(x·A)·B (``models/lora.py``)."""
    w_ = w[...].astype(x.dtype)
    lead, in_shape, out_shape = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:], w_.shape[n_in:]
    x2 = x.reshape(-1, math.prod(in_shape))
    y = x2 @ w_.reshape(math.prod(in_shape), -1)
    if lora is not None:
        a, b, scale = lora
        r = a.shape[-1]
        y = y + ((x2 @ a[...].astype(x.dtype).reshape(-1, r)) @ b[...].astype(x.dtype).reshape(r, -1)) * scale
    y = y.reshape(lead + out_shape)
    return y if bias is None else y + bias[...].astype(x.dtype)


def attend(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, key_mask_BxS, offset) -> jax.Array:
    """Causal GQA attention of T queries at slots offset..offset+T-1 over S key slots; softmax in float32.

    Query t may see key slot s iff s <= offset + t and key_mask_BxS[b, s]. A query with no visible key (a pad
    position before a row's first real token) gets a finite, meaningless output instead of NaN.
    Memory: the float32 scores are [B, N, T, S] (no flash attention here).
    """
    B, T, N, H = q_BxTxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bksh->bkgts", q_BxTxKxGxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    causal_TxS = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]
    allowed_Bx1x1xTxS = (key_mask_BxS[:, None, :] & causal_TxS[None])[:, None, None]
    scores = jnp.where(allowed_Bx1x1xTxS, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v_BxKxSxH)
    return out.reshape(B, T, N, H)


def causal_attention(key_mask_BxT, block: int | None):
    """The ``attention`` of a full-sequence forward (no cache): ``attend`` over the same T tokens, in query blocks of
    ``block`` positions, block j (queries [jb, (j+1)b)) over keys [0, (j+1)b) only. Equal to one ``attend`` over all
    T keys (the skipped keys are exactly the causally masked ones, whose probabilities are 0) up to the order of the
    softmax sums; about half the score FLOPs and bytes for T >> block."""
    def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
        T = q_BxTxNxH.shape[1]
        keys, values = _heads_first(k_BxTxKxH), _heads_first(v_BxTxKxH)
        b = T if block is None else block
        outs = [attend(q_BxTxNxH[:, s:s + b], keys[:, :, :s + b], values[:, :, :s + b], key_mask_BxT[:, :s + b], s)
                for s in range(0, T, b)]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return attention


def _heads_first(x_BxTxKxH: jax.Array) -> jax.Array:
    return x_BxTxKxH.transpose(0, 2, 1, 3)


def decoder_layer(cfg: ModelConfig, p: LayerStack, x_BxTxE, cos, sin, attention):
    """One decoder layer. ``attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH) -> out_BxTxNxH`` receives the new tokens'
    rotated queries and keys and their values; it stores them in a cache if there is one and attends over whatever
    keys it owns (the same tokens, a KV cache, a packed or shared-prompt layout)."""
    h = rms_norm(x_BxTxE, p.attn_norm, cfg.rms_norm_eps)
    q = _dense(h, p.q, 1, p.q_bias, adapter(cfg, p, "q"))
    k = _dense(h, p.k, 1, p.k_bias, adapter(cfg, p, "k"))
    v = _dense(h, p.v, 1, p.v_bias, adapter(cfg, p, "v"))
    if cfg.qk_norm:
        q, k = rms_norm(q, p.q_norm, cfg.rms_norm_eps), rms_norm(k, p.k_norm, cfg.rms_norm_eps)
    attn = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    x_BxTxE = x_BxTxE + _dense(attn, p.o, 2, p.o_bias, adapter(cfg, p, "o"))
    h = rms_norm(x_BxTxE, p.mlp_norm, cfg.rms_norm_eps)
    gated = (jax.nn.silu(_dense(h, p.gate, 1, p.gate_bias, adapter(cfg, p, "gate")))
             * _dense(h, p.up, 1, p.up_bias, adapter(cfg, p, "up")))
    # activations stay split over the batch (and whole along E) however the params are split
    return constrain_batch(x_BxTxE + _dense(gated, p.down, 1, p.down_bias, adapter(cfg, p, "down")), p.attn_norm[...])


def narrowed(w: jax.Array, dtype) -> jax.Array:
    """A float array cast to ``dtype`` where that is narrower (every use of a param casts it to the compute dtype
    first, so holding it narrowed changes no result); else ``w`` itself."""
    dtype = jnp.dtype(dtype)
    narrower = jnp.issubdtype(w.dtype, jnp.floating) and jnp.dtype(w.dtype).itemsize > dtype.itemsize
    return w.astype(dtype) if narrower else w


def embed_tokens(cfg: ModelConfig, embed: nnx.Param, tokens):
    """The tokens' embeddings in the compute dtype, split over the batch like every layer's output."""
    w = embed[...]
    return constrain_batch(jnp.take(w, tokens, axis=0).astype(cfg.compute_dtype), w)


def cached_attention(kv_write, key_mask_BxS, offset):
    """The ``attention`` of a layer with a KV cache: ``kv_write(k_BxTxKxH, v_BxTxKxH) -> (keys_BxKxSxH,
    values_BxKxSxH)`` stores the new k/v and returns the whole cached rows; queries sit at slots offset.."""
    def attention(q, k, v):
        keys, values = kv_write(k, v)
        return attend(q, keys, values, key_mask_BxS, offset)
    return attention


class Decoder(nnx.Module):
    """Embedding, the layer stack and the final norm: tokens -> final normed hidden states."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = init_param(rngs, cfg, ("vocab", "embed"), (cfg.vocab_size, cfg.hidden_size), "normal")
        self.layers = LayerStack(cfg, rngs=rngs)
        self.norm = init_param(rngs, cfg, ("norm",), (cfg.hidden_size,), "ones")

    def split_layers(self) -> tuple[nnx.State, ...]:
        """Each layer's params as its own state (static slices of the stacked params), cast to the compute dtype
        where it is narrower: every use casts them to it anyway (``_dense``, ``rms_norm``), so the decode loop's
        copies (and, with fsdp > 1, the all-gathers XLA hoists out of the loop) take half the bytes."""
        _, stack = nnx.split(self.layers)
        dtype = self.config.compute_dtype
        return tuple(jax.tree.map(lambda w, i=i: narrowed(w[i], dtype), stack) for i in range(self.config.num_layers))

    def __call__(self, tokens_BxT, positions_BxT=None, attention_mask_BxT=None, cache: KVCache | None = None,
                 layers: tuple[nnx.State, ...] | None = None):
        cfg = self.config
        tokens_BxT = jnp.asarray(tokens_BxT)
        if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
            raise ValueError(f"tokens_BxT must be a 2-D integer array, got {tokens_BxT.dtype}{list(tokens_BxT.shape)}")
        B, T = tokens_BxT.shape
        mask_BxT = (jnp.ones((B, T), bool) if attention_mask_BxT is None
                    else jnp.asarray(attention_mask_BxT).astype(bool))
        if mask_BxT.shape != (B, T):
            raise ValueError(f"attention_mask_BxT has shape {mask_BxT.shape}, expected tokens' shape {(B, T)}")
        if cache is not None and cache.mask_BxS.shape[0] != B:
            raise ValueError(f"cache holds {cache.mask_BxS.shape[0]} rows but tokens_BxT has {B}")
        if positions_BxT is None:  # first real token of each row is position 0; pads repeat a neighbour's position
            start_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths_B
            positions_BxT = start_B[:, None] + jnp.maximum(jnp.cumsum(mask_BxT, axis=1, dtype=jnp.int32) - 1, 0)
        cos, sin = rope_tables(positions_BxT, inv_frequencies(cfg), cfg.compute_dtype)
        x_BxTxE = embed_tokens(cfg, self.embed, tokens_BxT)
        graphdef, stack = nnx.split(self.layers)

        if cache is None:
            def body(x, layer_state):
                p = nnx.merge(graphdef, layer_state)
                return decoder_layer(cfg, p, x, cos, sin, causal_attention(mask_BxT, cfg.attention_block)), None

            body = jax.checkpoint(body) if cfg.remat else body
            x_BxTxE, _ = jax.lax.scan(body, x_BxTxE, stack, unroll=1 if cfg.scan_layers else cfg.num_layers)
            return rms_norm(x_BxTxE, self.norm, cfg.rms_norm_eps), None

        index = cache.index
        key_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT, (0, index))
        if T == 1:
            layers = self.split_layers() if layers is None else layers
            x_BxTxE, ks, vs = self._decode_layers(x_BxTxE, graphdef, layers, cos, sin, cache, key_mask_BxS)
        else:
            x_BxTxE, ks, vs = self._prefill_layers(x_BxTxE, graphdef, stack, cos, sin, cache, key_mask_BxS)
        new_cache = KVCache(k_BxKxSxH=ks, v_BxKxSxH=vs, mask_BxS=key_mask_BxS, index=index + T)
        return rms_norm(x_BxTxE, self.norm, cfg.rms_norm_eps), new_cache

    def _decode_layers(self, x_BxTxE, graphdef, layers, cos, sin, cache: KVCache, key_mask_BxS):
        """One new token per row: the layers unrolled in Python, each writing its own cache buffer in place.
        ``layers``: ``split_layers()``, made once outside a decode loop (inside it, XLA would copy every layer's
        weight slice on every step). Returns (x, keys, values)."""
        ks, vs = list(cache.k_BxKxSxH), list(cache.v_BxKxSxH)
        index = cache.index
        for i in range(self.config.num_layers):
            p = nnx.merge(graphdef, layers[i])

            def kv_write(k, v, i=i):
                ks[i] = jax.lax.dynamic_update_slice(ks[i], _heads_first(k).astype(ks[i].dtype), (0, 0, index, 0))
                vs[i] = jax.lax.dynamic_update_slice(vs[i], _heads_first(v).astype(vs[i].dtype), (0, 0, index, 0))
                return ks[i].astype(k.dtype), vs[i].astype(v.dtype)

            x_BxTxE = decoder_layer(self.config, p, x_BxTxE, cos, sin, cached_attention(kv_write, key_mask_BxS, index))
        return x_BxTxE, tuple(ks), tuple(vs)

    def _prefill_layers(self, x_BxTxE, graphdef, stack, cos, sin, cache: KVCache, key_mask_BxS):
        """Several new tokens per row (the prompt): a scan over the stacked layers (compile time independent of
        depth) on a stacked copy of the cache, split back into per-layer buffers. Returns (x, keys, values)."""
        cfg, index = self.config, cache.index

        def body_cached(carry, xs):
            x, k_all, v_all = carry
            layer_state, i = xs
            p = nnx.merge(graphdef, layer_state)

            def kv_write(k, v):  # write this layer's new k/v at slot `index`, then attend over the whole cache row
                nonlocal k_all, v_all
                k_all = jax.lax.dynamic_update_slice(k_all, _heads_first(k)[None].astype(k_all.dtype),
                                                     (i, 0, 0, index, 0))
                v_all = jax.lax.dynamic_update_slice(v_all, _heads_first(v)[None].astype(v_all.dtype),
                                                     (i, 0, 0, index, 0))
                return k_all[i].astype(k.dtype), v_all[i].astype(v.dtype)

            x = decoder_layer(cfg, p, x, cos, sin, cached_attention(kv_write, key_mask_BxS, index))
            return (x, k_all, v_all), None

        body_cached = jax.checkpoint(body_cached) if cfg.remat else body_cached
        carry = (x_BxTxE, jnp.stack(cache.k_BxKxSxH), jnp.stack(cache.v_BxKxSxH))
        (x_BxTxE, k_all, v_all), _ = jax.lax.scan(body_cached, carry, (stack, jnp.arange(cfg.num_layers)))
        return x_BxTxE, tuple(k_all), tuple(v_all)
