"""Held-out evaluation: greedy accuracy, and pass@k / mean@k / maj@k, with the experiment's correctness reward."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import CausalLM
from grpo_jax.multihost import to_host
from grpo_jax.rewards import RewardPool, RewardsConfig, reward_table
from grpo_jax.rewards.verifiers import answer_key
from grpo_jax.rollout import Rollout, generate


def encode_prompts(tokenizer, examples: Sequence[dict]) -> list[list[int]]:
    return [tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"] for ex in examples]


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Every completion as text (on every process: a collective when the rollout spans processes)."""
    tokens, lengths = to_host(rollout.completion_BxT), to_host(rollout.lengths_B)
    return tokenizer.batch_decode([row[:n] for row, n in zip(tokens, lengths)], skip_special_tokens=True)


def correctness(rewards: RewardsConfig, name: str, prompts, completions, examples, group_size: int, pool) -> np.ndarray:
    """Per-sample bool: the reward ``name`` (alone, weight 1, no shaping) is > 0."""
    spec = next(s for s in rewards.fns if s.name == name)
    only = dataclasses.replace(rewards, fns=(dataclasses.replace(spec, weight=1.0),), overlong=None)
    _, values, _ = reward_table(only, prompts, completions, examples, group_size=group_size, pool=pool)
    return values[name] > 0


def majority_correct(keys_PxK: Sequence[Sequence[str | None]], correct_PxK: np.ndarray) -> np.ndarray:
    """maj@k per prompt: the answer given most often among its k samples (``answer_key``; samples without an answer
    do not vote; a tie goes to the answer that reached the top count first in sample order) is correct. A prompt
    with no answer at all counts as wrong."""
    out = np.zeros(len(keys_PxK), bool)
    for p, keys in enumerate(keys_PxK):
        counts: dict[str, int] = {}
        best = None
        for i, key in enumerate(keys):
            if key is None:
                continue
            counts[key] = counts.get(key, 0) + 1
            if best is None or counts[key] > counts[keys[best]]:
                best = i
        out[p] = best is not None and bool(correct_PxK[p][best])
    return out


def accuracy_by_level(correct_B: np.ndarray, examples: Sequence[dict], prefix: str) -> dict[str, float]:
    """``{prefix}/level_<k>``: the mean of ``correct_B`` over the samples whose example has ``level`` k (synthetic
    tasks); empty when the examples carry no level."""
    if not examples or "level" not in examples[0]:
        return {}
    levels_B = np.array([ex["level"] for ex in examples])
    return {f"{prefix}/level_{k}": float(correct_B[levels_B == k].mean()) for k in np.unique(levels_B)}


def evaluate(
    model: CausalLM,
    tokenizer,
    examples: Sequence[dict],
    *,
    rewards: RewardsConfig,
    correct_reward: str,
    max_new_tokens: int,
    batch_prompts: int,
    pass_k: int = 0,
    temperature: float = 1.0,
    key: jax.Array,
    pool: RewardPool | None = None,
    mesh: Mesh | None = None,
    min_prompt_bucket: int = 16,
) -> dict[str, float]:
    """``eval/accuracy`` (greedy; ``eval/accuracy/level_<k>`` per difficulty level), ``eval/length`` and, with
    pass_k > 0, ``eval/pass@k`` (any of k samples correct), ``eval/mean@k`` (mean sample accuracy) and ``eval/maj@k``
    (the majority answer of the k samples is correct, ``majority_correct``) over
    ``examples``, in fixed-size batches (few compilations).
    ``mesh``: the model's mesh; generation is split over its batch axes (see ``generate``)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    common = dict(max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                  mesh=mesh, min_prompt_bucket=min_prompt_bucket)
    correct, lengths, any_k, mean_k, maj_k = [], [], [], [], []
    for start in range(0, len(examples), batch_prompts):
        chunk = list(examples[start:start + batch_prompts])
        ids = encode_prompts(tokenizer, chunk)
        prompts = [ex["prompt"] for ex in chunk]
        greedy = generate(model, ids, temperature=0.0, rng=key, **common)
        ok = correctness(rewards, correct_reward, prompts, decode_completions(tokenizer, greedy), chunk, 1, pool)
        correct.append(ok)
        lengths.append(to_host(greedy.lengths_B))
        if pass_k:
            sampled = generate(model, ids, num_samples=pass_k, temperature=temperature,
                               rng=jax.random.fold_in(key, start), **common)
            rep = lambda xs: [x for x in xs for _ in range(pass_k)]  # noqa: E731
            texts = decode_completions(tokenizer, sampled)
            ok_k = correctness(rewards, correct_reward, rep(prompts), texts, rep(chunk), pass_k,
                               pool).reshape(-1, pass_k)
            any_k.append(ok_k.any(axis=1))
            mean_k.append(ok_k.mean(axis=1))
            keys = [answer_key(t) for t in texts]
            maj_k.append(majority_correct([keys[i:i + pass_k] for i in range(0, len(keys), pass_k)], ok_k))
    correct_all = np.concatenate(correct)
    out = {"eval/accuracy": float(correct_all.mean()), "eval/length": float(np.concatenate(lengths).mean()),
           **accuracy_by_level(correct_all, examples, "eval/accuracy")}
    if pass_k:
        out[f"eval/pass@{pass_k}"] = float(np.concatenate(any_k).mean())
        out[f"eval/mean@{pass_k}"] = float(np.concatenate(mean_k).mean())
        out[f"eval/maj@{pass_k}"] = float(np.concatenate(maj_k).mean())
    return out
