"""PPO's critic: a value head on the policy's own backbone (``algo.ppo.critic: head``, a shared trunk), or a separate
value model as large as the policy (``separate``, as in InstructGPT's and DeepSeekMath's PPO).

``add_value_head`` attaches ``policy.value_head`` (float32 weight [E] and bias, zero-initialised so V starts at 0)
to the CausalLM, so its params sit next to the policy's in one ``nnx.State``: the optimizer, the checkpoint tree and
the sharding rules cover it unchanged, and ``save_hf`` leaves it out (it is not in the HF weight table).

``add_critic_model`` attaches ``policy.critic``, a ``ValueModel``: its own decoder (a copy of the policy's, or of
another model's, e.g. a reward model's) and value head. It also sits in the policy's state (under ``critic/``), so it
is sharded by the same rules and checkpointed with the policy, and ``save_hf`` leaves it out; the optimizer gives it
its own learning rate and clipping (``grpo_jax.optim.make_optimizer(critic=...)``), and the reference copies only the
policy (``grpo_jax.run.build_run``). Its gradients come only from the value loss: the two networks share nothing.

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


class ValueModel(nnx.Module):
    """A separate critic: a decoder and a value head; V(s_t) from its own final hidden states."""

    def __init__(self, decoder: nnx.Module, hidden_size: int):
        self.model = decoder
        self.value_head = ValueHead(hidden_size)

    def hidden_states(self, tokens_BxT, positions_BxT=None, attention_mask_BxT=None):
        return self.model(tokens_BxT, positions_BxT, attention_mask_BxT, None)[0]


def add_critic_model(policy: CausalLM, mesh, source: nnx.Module | None = None) -> CausalLM:
    """Attach ``policy.critic``: a ``ValueModel`` whose decoder is a copy of ``source.model`` (default: the policy's
    own decoder as it is now, e.g. after the warm start) with a zero-initialised value head (in place, placed on
    ``mesh``). The copy owns its buffers: the train step donates the params."""
    if hasattr(policy, "critic") or hasattr(policy, "value_head"):
        raise ValueError("the policy already has a critic")
    graphdef, state = nnx.split((policy if source is None else source).model)
    decoder = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    policy.critic = ValueModel(decoder, decoder.config.hidden_size)
    return shard_model(policy, mesh)


def critic_values(policy: CausalLM, tokens_BxT, mask_BxT, hidden_BxTxE=None) -> jax.Array:
    """``token_values`` of the policy's critic: ``policy.critic``'s own pass when it has one, else the value head on
    the policy's ``hidden_BxTxE`` (computed here when not given)."""
    critic = getattr(policy, "critic", None)
    if critic is not None:
        return token_values(critic, critic.hidden_states(tokens_BxT, None, mask_BxT), mask_BxT)
    if hidden_BxTxE is None:
        hidden_BxTxE = policy.hidden_states(tokens_BxT, None, mask_BxT)
    return token_values(policy, hidden_BxTxE, mask_BxT)


def token_values(policy: CausalLM, hidden_BxTxE: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """values_BxT[b, t] = V(hidden[b, t-1]) where tokens t and t-1 are both real (``mask_BxT``), else 0. float32."""
    if not hasattr(policy, "value_head"):
        raise ValueError("the model has no value_head; call grpo_jax.critic.add_value_head first (algo.kind=ppo)")
    mask = jnp.asarray(mask_BxT).astype(bool)
    v_BxT = jnp.pad(policy.value_head(hidden_BxTxE[:, :-1]), ((0, 0), (1, 0)))
    valid_BxT = jnp.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(valid_BxT, v_BxT, 0.0)


def logprobs_and_values(policy: CausalLM, tokens_BxT, mask_BxT, *, temperature, return_entropy: bool, chunk_size: int):
    """(logps_BxT, entropy_BxT or None, values_BxT) from one decoder pass (two with a separate critic)."""
    hidden_BxTxE = policy.hidden_states(tokens_BxT, None, mask_BxT)
    head_ExV = policy.lm_head_ExV(for_logprobs=True)
    out = logprobs_from_hidden(hidden_BxTxE, tokens_BxT, jnp.asarray(mask_BxT).astype(bool), head_ExV,
                               temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
    logps, entropy = out if return_entropy else (out, None)
    return logps, entropy, critic_values(policy, tokens_BxT, mask_BxT, hidden_BxTxE)


def value_fn(graphdef: nnx.GraphDef):
    """Jitted ``(params, tokens_BxS, mask_BxS) -> values_BxS`` (the rollout-time "old" values, no gradient)."""

    @jax.jit
    def fn(params, tokens_BxS, mask_BxS):
        return critic_values(nnx.merge(graphdef, params), tokens_BxS, mask_BxS)

    return fn

