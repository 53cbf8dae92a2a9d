"""KV cache for prefill-once, decode-many sampling.

Layout (``L`` layers, ``B`` rows, ``S`` = max cache length, ``K`` kv heads, ``H`` head_dim)::

    k_BxKxSxH, v_BxKxSxH   one array per layer (tuples of L): keys (after rope) and values of every cached token,
                           in the compute dtype
    mask_BxS               True where a slot holds a real (non-pad) token
    index                  int32 scalar: the next slot to write, SHARED by all rows

Why one buffer per layer, slots next to head_dim: a decode step writes one slot per layer in place and reads each
layer's keys as ``[B*K]`` contiguous ``[S, H]`` matrices. A stacked ``[L, ...]`` cache inside a scan over layers
copies the layer's cache slice on every step, which made decode attention ~2.7x slower on CPU
(``benchmarks/rollout.py`` measures the whole sampler).

All rows write at the same slot: prompts are left-padded to one length ``T_prompt``, so after the prefill every row
has written slots ``[0, T_prompt)`` (pad slots marked False in ``mask_BxS``) and each decode step writes one slot
``index`` for every row. A row's rope positions count only its real tokens (the first real token is position 0), so
the next position of row b is ``sum(mask_BxS[b])`` (``lengths_B``): left padding does not shift positions.

Broadcast to G samples without recomputation: prefill a ``[P, T_prompt]`` batch once, then ``cache.repeat(G)``
gives the ``[P*G, ...]`` cache with rows ``p*G .. p*G+G-1`` copies of prompt p (``jnp.repeat`` order).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from grpo_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    k_BxKxSxH: tuple[jax.Array, ...]
    v_BxKxSxH: tuple[jax.Array, ...]
    mask_BxS: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache (all slots masked, index 0); dtype defaults to the model's compute dtype."""
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        dtype = cfg.compute_dtype if dtype is None else dtype
        return cls(
            k_BxKxSxH=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v_BxKxSxH=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            mask_BxS=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask_BxS.shape[1]

    @property
    def lengths_B(self) -> jax.Array:
        """Real tokens cached per row = the rope position of the row's next token."""
        return self.mask_BxS.sum(axis=1, dtype=jnp.int32)

    def repeat(self, num_samples: int) -> KVCache:
        """Each row repeated ``num_samples`` times along the batch (row b -> rows b*G .. b*G+G-1)."""
        return KVCache(
            k_BxKxSxH=tuple(jnp.repeat(k, num_samples, axis=0) for k in self.k_BxKxSxH),
            v_BxKxSxH=tuple(jnp.repeat(v, num_samples, axis=0) for v in self.v_BxKxSxH),
            mask_BxS=jnp.repeat(self.mask_BxS, num_samples, axis=0),
            index=self.index,
        )
