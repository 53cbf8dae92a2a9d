"""The loop's first two stages, collect (rollout) and score (rewards), and the records between them: a plain batch, a
batch refilled with groups that carry signal (DAPO's dynamic sampling, ``refill``), or one produced in the rollout
pipeline's thread (``produce``). Everything random comes from ``(cfg.seed, step)`` and the data order in ``RunState``,
so a resumed run samples exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.algorithms import Scored
from grpo_jax.data import batch_at
from grpo_jax.evaluation import accuracy_by_level, decode_completions, encode_prompts
from grpo_jax.group_size import rollout_rows
from grpo_jax.mesh import shard_batch
from grpo_jax.multihost import to_host
from grpo_jax.pipeline import Produced
from grpo_jax.rewards import reward_table, zero_variance_mask
from grpo_jax.rollout import Rollout, generate
from grpo_jax.run import Run
from grpo_jax.run_state import RunState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Collected:
    """One step's prompts and their sampled completions (rows ``[0, n_valid)`` are real)."""

    examples: list[dict]
    rows: list[dict]  # the example of each row
    sizes: np.ndarray  # rows per prompt
    n_valid: int
    group_ids_B: np.ndarray | None  # ragged groups (dynamic group size)
    rollout: Rollout
    lengths_B: np.ndarray


def collect(run: Run, rs: RunState, step: int, params=None, attempt: int = 0) -> tuple[Collected, RunState]:
    """Step ``step``'s batch (the next ``batch_prompts`` prompts of the data order) sampled with the current params,
    or with ``params`` when given (already made by ``run.sampler_params``); without them the current params are
    cast/resharded first when the sampler has its own dtype or mesh. ``attempt``: the dynamic-sampling round."""
    cfg = run.cfg
    examples, order = batch_at(run.splits.train, rs.order, batch_size=cfg.train.batch_prompts, seed=cfg.data.seed)
    if params is None:
        params = run.sampler_params(rs.train.params) if run.separate_sampler else rs.train.params
    return sample(run, params, examples, rs.history, step, attempt), dataclasses.replace(rs, order=order)


def sample(run: Run, params, examples: list[dict], history, step: int, attempt: int = 0) -> Collected:
    """Step ``step``'s completions of ``examples`` sampled with ``params`` (key ``fold_in(run.key, step)``, folded
    with ``attempt`` too for the later rounds of dynamic sampling), in the sampler's dtype and on its mesh when
    ``rollout.dtype``/``rollout.mesh`` are set (``params`` already made by ``run.sampler_params``); the samples are
    returned on the trainer's mesh."""
    cfg, G = run.cfg, run.cfg.rollout.group_size
    rows, sizes, n_valid, ids_B = rollout_rows(examples, G, history, cfg.rollout.max_new_tokens)
    fixed = history is None
    model = nnx.merge(run.graphdef if run.sampler_graphdef is None else run.sampler_graphdef, params)
    ro = generate(model, encode_prompts(run.tokenizer, examples if fixed else rows),
                  max_new_tokens=cfg.rollout.max_new_tokens, num_samples=G if fixed else 1,
                  temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                  eos_ids=run.eos_ids, pad_id=run.tokenizer.pad_token_id, rng=rollout_key(run, step, attempt),
                  min_prompt_bucket=run.prompt_bucket, mesh=run.sampler_mesh or run.mesh)
    ro = run.to_trainer(ro)
    return Collected(examples, rows, sizes, n_valid, ids_B, ro, to_host(ro.lengths_B))


def rollout_key(run: Run, step: int, attempt: int = 0) -> jax.Array:
    key = jax.random.fold_in(run.key, step)
    return key if attempt == 0 else jax.random.fold_in(key, attempt)


def refill(run: Run, rs: RunState, step: int, params) -> tuple[Collected, Scored, np.ndarray, dict, RunState]:
    """DAPO's dynamic sampling (``train.dynamic_sampling``). Round 0 samples and scores the next ``batch_prompts``
    prompts as a plain step does; while fewer than ``batch_prompts`` groups have rewards that differ, another round
    samples the next ``batch_prompts`` prompts of the data order (at most ``train.dynamic_sampling_rounds`` extra
    rounds; round r's key is the step's key folded with r). The step trains on the first ``batch_prompts``
    signal-carrying groups in draw order. When the rounds run out first, round 0's zero-variance groups complete the
    batch, masked out of the loss, counted (``dynamic_sampling/short_groups``) and warned about.

    Metrics: ``reward/*``, ``accuracy*`` and ``length/*`` describe round 0 (a plain batch of the policy's samples, so
    curves compare with runs without refill); ``dynamic_sampling/{rounds, generated_groups, kept_groups,
    short_groups}`` the refill; ``train/*``, ``adv/*`` and ``kept_frac`` the refilled batch."""
    cfg, G, P = run.cfg, run.cfg.rollout.group_size, run.cfg.train.batch_prompts
    rounds, picked = [], []  # picked: (round, group) in draw order
    for attempt in range(1 + cfg.train.dynamic_sampling_rounds):
        col, rs = collect(run, rs, step, params, attempt)
        scored, correct_B, metrics = score(run, col)
        rounds.append((col, scored, correct_B, metrics))
        r_PxG = np.asarray(scored.rewards_B, np.float64).reshape(P, G)
        picked += [(attempt, g) for g in np.flatnonzero(r_PxG.max(1) != r_PxG.min(1))[:P - len(picked)]]
        if len(picked) == P:
            break
    short = P - len(picked)
    if short:
        taken = {g for r, g in picked if r == 0}
        picked += [(0, g) for g in range(P) if g not in taken][:short]
        log.warning("step %d: dynamic sampling found %d of %d groups with differing rewards in %d rounds; %d "
                    "zero-variance groups fill the batch, masked", step, P - short, P, len(rounds), short)
    col0, scored0, correct0, metrics0 = rounds[0]
    hosts = [jax.tree.map(to_host, c.rollout) for c, *_ in rounds]
    width = max(h.prompt_BxP.shape[1] for h in hosts)
    pad = {"prompt_BxP": run.tokenizer.pad_token_id, "prompt_mask_BxP": 0}  # prompts are left-padded

    def gather(name):
        parts = [getattr(hosts[r], name)[g * G:(g + 1) * G] for r, g in picked]
        if name in pad:
            parts = [np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=pad[name]) for x in parts]
        return np.concatenate(parts)

    rollout = Rollout(**shard_batch({f.name: gather(f.name) for f in dataclasses.fields(Rollout)}, run.mesh))
    rows_of = lambda name: np.concatenate([np.asarray(getattr(rounds[r][1], name))[g * G:(g + 1) * G]  # noqa: E731
                                           for r, g in picked])
    keep_B = np.repeat(np.arange(P) < P - short, G)
    correct_B = np.concatenate([rounds[r][2][g * G:(g + 1) * G] for r, g in picked])
    examples = [rounds[r][0].examples[g] for r, g in picked]
    col = Collected(examples, [ex for ex in examples for _ in range(G)], np.full(P, G), P * G, None, rollout,
                    to_host(rollout.lengths_B))
    scored = Scored(rollout, rows_of("rewards_B"), jnp.asarray(keep_B), P * G, None)
    sample_metrics = {k: v for k, v in step_metrics(col0, scored0, correct0, rs).items()
                      if k not in ("kept_frac", "shape/prompt_len")}
    return col, scored, correct_B, metrics0 | sample_metrics | {
        "dynamic_sampling/rounds": len(rounds), "dynamic_sampling/generated_groups": P * len(rounds),
        "dynamic_sampling/kept_groups": P - short, "dynamic_sampling/short_groups": short}, rs


def produce(run: Run, params, examples: list[dict], step: int, version: int) -> Produced:
    """A pipelined batch (``grpo_jax.pipeline``, in its thread): ``sample`` with the params of ``version``, then
    ``score``."""
    t0 = time.perf_counter()
    col = sample(run, params, examples, None, step)
    t1 = time.perf_counter()
    scored, correct_B, metrics = score(run, col)
    return Produced(col, scored, correct_B, metrics, version, t1 - t0, time.perf_counter() - t1)


def score(run: Run, col: Collected) -> tuple[Scored, np.ndarray, dict]:
    """(scored rollout, correct_B of the real rows, reward metrics)."""
    cfg, B, n = run.cfg, run.cfg.train.batch_prompts * run.cfg.rollout.group_size, col.n_valid
    fixed = col.group_ids_B is None
    rewards_B, values, metrics = reward_table(cfg.rewards, [e["prompt"] for e in col.rows[:n]],
                                              decode_completions(run.tokenizer, col.rollout)[:n], col.rows[:n],
                                              group_size=cfg.rollout.group_size if fixed else 1,
                                              lengths_B=col.lengths_B[:n], pool=run.pool, terms=run.terms)
    if not fixed:  # ragged groups were scored as groups of 1: step_metrics measures them per real group
        metrics.pop("reward/zero_variance_fraction")
    rewards_B = np.pad(rewards_B, (0, B - n))
    keep_B = (zero_variance_mask(rewards_B, cfg.rollout.group_size) if cfg.train.mask_zero_variance
              else jnp.ones(B, bool))
    keep_B = keep_B & (jnp.arange(B) < n)
    ids_B = None if fixed else jnp.asarray(col.group_ids_B)
    return Scored(col.rollout, rewards_B, keep_B, n, ids_B), values[cfg.correct_reward] > 0, metrics


def step_metrics(col: Collected, scored: Scored, correct_B: np.ndarray, rs: RunState) -> dict:
    """What one step shows besides the rewards, the advantages and the update: lengths, accuracy, group sizes."""
    lengths, n = col.lengths_B[:col.n_valid], col.n_valid
    out = {"length/mean": lengths.mean(), "length/max": lengths.max(),
           "length/clipped_frac": 1 - to_host(col.rollout.finished_B)[:n].mean()}
    for name, sel in (("correct", correct_B), ("incorrect", ~correct_B)):
        out[f"length/{name}_mean"] = lengths[sel].mean() if sel.any() else float("nan")
    out |= accuracy_by_level(correct_B, col.rows[:n], "accuracy")
    if rs.history is not None:
        solved = [np.ptp(r) == 0 for r in np.split(scored.rewards_B[:n], np.cumsum(col.sizes)[:-1])]
        out |= {"group/size_min": col.sizes.min(), "group/size_max": col.sizes.max(), "group/rows_used": n,
                "reward/zero_variance_fraction": float(np.mean(solved))}
    return out | {"accuracy": correct_B.mean(), "kept_frac": float(np.asarray(scored.keep_B).mean()),
                  "shape/prompt_len": col.rollout.prompt_BxP.shape[1]}
