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

The sampler prefills a ``[P, T_prompt]`` batch into a ``KVCache`` once, then decodes its G samples per prompt
over a ``GroupKVCache``, which keeps that prompt part once per prompt (never copied G times) beside each row's
own completion slots.
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


@struct.dataclass
class GroupKVCache:
    """The decode cache of G samples per prompt: the prompt part once per prompt, the completion part per row.

    Layout (``P`` prompts, ``B = P*G`` rows in group order: rows ``p*G .. p*G+G-1`` sample prompt p; ``L`` prompt
    slots; one entry per layer in each outer tuple)::

        prompt_k_PxKxLxH, prompt_v_PxKxLxH   the prefilled prompt keys (after rope) and values, read-only
        prompt_mask_PxL                      True where a prompt slot holds a real token
        k_blocks, v_blocks                   per layer, a tuple of completion blocks [B, K, S_j, H] (the rows' own
                                             keys and values; block j holds the S_j slots after blocks 0..j-1)
        index                                int32 scalar: completion slots written so far, the same for every row
        num_samples                          G (static)

    Row b's next token sits at rope position ``prompt_lengths[b // G] + index`` and attends to its prompt's real
    slots and to its completion slots ``0 .. index`` (``grpo_jax.models.decode``). A decode loop adds blocks as it
    goes (``extend``: static sizes, no copy of the blocks already written), so attention reads only slots that can
    be filled, and the cache holds no more completion slots than the loop writes.
    """
    prompt_k_PxKxLxH: tuple[jax.Array, ...]
    prompt_v_PxKxLxH: tuple[jax.Array, ...]
    prompt_mask_PxL: jax.Array
    k_blocks: tuple[tuple[jax.Array, ...], ...]
    v_blocks: tuple[tuple[jax.Array, ...], ...]
    index: jax.Array
    num_samples: int = struct.field(pytree_node=False)

    @classmethod
    def from_prefill(cls, prefill: KVCache, num_samples: int) -> GroupKVCache:
        """The prompt part from a prefilled ``KVCache`` whose every slot is a prompt slot, for ``num_samples`` rows
        per prompt; no completion slots yet (``extend`` adds them)."""
        no_blocks = tuple(() for _ in prefill.k_BxKxSxH)
        return cls(prompt_k_PxKxLxH=prefill.k_BxKxSxH, prompt_v_PxKxLxH=prefill.v_BxKxSxH,
                   prompt_mask_PxL=prefill.mask_BxS, k_blocks=no_blocks, v_blocks=no_blocks,
                   index=jnp.zeros((), jnp.int32), num_samples=num_samples)

    @property
    def slots(self) -> int:
        """Completion slots in all blocks."""
        return sum(k.shape[2] for k in self.k_blocks[0])

    @property
    def positions_B(self) -> jax.Array:
        """Rope position of each row's next token: its prompt's real tokens plus the completion slots written."""
        prompt_lengths_P = self.prompt_mask_PxL.sum(axis=1, dtype=jnp.int32)
        return jnp.repeat(prompt_lengths_P, self.num_samples) + self.index

    def extend(self, slots: int) -> GroupKVCache:
        """The same cache with one more (empty) block, so that it has ``slots`` completion slots in all."""
        if slots <= self.slots:
            raise ValueError(f"GroupKVCache.extend: {slots} slots <= the {self.slots} it already has")
        P, K, _, H = self.prompt_k_PxKxLxH[0].shape
        shape = (P * self.num_samples, K, slots - self.slots, H)
        return self.replace(k_blocks=tuple(b + (jnp.zeros(shape, b0.dtype),)
                                           for b, b0 in zip(self.k_blocks, self.prompt_k_PxKxLxH)),
                            v_blocks=tuple(b + (jnp.zeros(shape, b0.dtype),)
                                           for b, b0 in zip(self.v_blocks, self.prompt_v_PxKxLxH)))
