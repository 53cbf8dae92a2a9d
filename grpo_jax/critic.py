"""PPO's critic: a value head on the policy's own backbone (shared trunk, as in the RLHF PPO of Ouyang et al. 2022).

``add_value_head`` attaches ``policy.value_head`` (float32 weight [E] and bias, zero-initialised so V starts at 0)
to the CausalLM, so its params sit next to the policy's in one ``nnx.State``: the optimizer, the checkpoint tree and
the sharding rules cover it unchanged, and ``save_hf`` leaves it out (it is not in the HF weight table).

Token t of a row is the action taken in state s_t = tokens[:t]; V(s_t) reads the hidden state at position t-1, the
same position whose logits give log π(token_t), so ``token_values`` is aligned (and masked) like ``token_logprobs``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.mesh import shard_model
from grpo_jax.models import CausalLM
from grpo_jax.models.logprobs import logprobs_from_hidden


class ValueHead(nnx.Module):
    """V(h) = h·w + b in float32."""

    def __init__(self, hidden_size: int):
        self.w = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), out_sharding=("embed",), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)

    def __call__(self, hidden_BxTxE: jax.Array) -> jax.Array:
        h = hidden_BxTxE.astype(jnp.float32)
        return jnp.einsum("bte,e->bt", h, self.w[...]) + self.b[...]


def add_value_head(policy: CausalLM, mesh) -> CausalLM:
    """Attach a zero-initialised ``ValueHead`` as ``policy.value_head`` (in place, placed on ``mesh``)."""
    if hasattr(policy, "value_head"):
        raise ValueError("the policy already has a value_head")
    policy.value_head = ValueHead(policy.config.hidden_size)
    return shard_model(policy, mesh)


def token_values(policy: CausalLM, hidden_BxTxE: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """values_BxT[b, t] = V(hidden[b, t-1]) where tokens t and t-1 are both real (``mask_BxT``), else 0. float32."""
    if not hasattr(policy, "value_head"):
        raise ValueError("the policy has no value_head; call grpo_jax.critic.add_value_head first (algo.kind=ppo)")
    mask = jnp.asarray(mask_BxT).astype(bool)
    v_BxT = jnp.pad(policy.value_head(hidden_BxTxE[:, :-1]), ((0, 0), (1, 0)))
    valid_BxT = jnp.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(valid_BxT, v_BxT, 0.0)


def logprobs_and_values(policy: CausalLM, tokens_BxT, mask_BxT, *, temperature, return_entropy: bool, chunk_size: int):
    """(logps_BxT, entropy_BxT or None, values_BxT) from one decoder pass."""
    hidden_BxTxE = policy.hidden_states(tokens_BxT, None, mask_BxT)
    out = logprobs_from_hidden(hidden_BxTxE, tokens_BxT, jnp.asarray(mask_BxT).astype(bool), policy.lm_head_ExV(),
                               temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
    logps, entropy = out if return_entropy else (out, None)
    return logps, entropy, token_values(policy, hidden_BxTxE, mask_BxT)


def value_fn(graphdef: nnx.GraphDef):
    """Jitted ``(params, tokens_BxS, mask_BxS) -> values_BxS`` (the rollout-time "old" values, no gradient)."""

    @jax.jit
    def fn(params, tokens_BxS, mask_BxS):
        policy = nnx.merge(graphdef, params)
        return token_values(policy, policy.hidden_states(tokens_BxS, None, mask_BxS), mask_BxS)

    return fn

