"""The training loop, the only stateful code: five stages with typed records between them,

    collect (rollout) -> score (rewards) -> assemble (the algorithm's batch) -> update (the jitted step) -> record

and one ``RunState`` holding everything a checkpoint saves. Everything random is derived from ``(cfg.seed, step)``
and the data order is a two-int state, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would have taken. The loop knows no algorithm by name: ``grpo_jax.algorithms`` does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from grpo_jax.algorithms import Passes, Scored
from grpo_jax.data import batch_at
from grpo_jax.evaluation import accuracy_by_level, decode_completions, encode_prompts, evaluate
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.group_size import rollout_rows
from grpo_jax.mesh import shard_batch
from grpo_jax.multihost import is_primary, to_host
from grpo_jax.perf import step_throughput
from grpo_jax.pipeline import Produced, RolloutPipeline, sampler_slots
from grpo_jax.rewards import reward_table, zero_variance_mask
from grpo_jax.rollout import Rollout, generate
from grpo_jax.run import Run, build_run, cost_metrics
from grpo_jax.run_setup import export_hf
from grpo_jax.run_state import RunState
from grpo_jax.tracking import compile_count, device_memory
from grpo_jax.train_step import Batch

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The machine is going away (SIGTERM, or JAX's preemption notice); a checkpoint of ``step`` was saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}")
        self.step = step


class NonFiniteLoss(RuntimeError):
    pass


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
    model = nnx.merge(run.sampler_graphdef or run.graphdef, params)
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


def start_pipeline(run: Run, rs: RunState, start: int) -> RolloutPipeline | None:
    """The rollout pipeline of ``rollout.mode`` one_step_off/async, resuming with the checkpoint's sampler params."""
    depth, cfg = run.cfg.rollout.depth, run.cfg
    if cfg.rollout.mode == "sync":
        return None
    snapshots = dict(zip(sampler_slots(depth, start), rs.sampler_params)) if start > 0 else {}
    return RolloutPipeline(functools.partial(produce, run), run.sampler_params, depth=depth, start=start,
                           order=rs.order, snapshots=snapshots, splits_train=run.splits.train,
                           batch_prompts=cfg.train.batch_prompts, data_seed=cfg.data.seed)


def rollout_stage(run: Run, rs: RunState, step: int, pipe: RolloutPipeline | None):
    """(collected, scored, correct_B, metrics, rs, times) of step ``step``: sampled now, or taken from the pipeline
    (which is first given θ_step for the batch it submits next)."""
    t0 = time.perf_counter()
    if pipe is None:
        params = jax.block_until_ready(run.sampler_params(rs.train.params)) if run.separate_sampler else None
        t1 = time.perf_counter()
        if run.cfg.train.dynamic_sampling:  # rollout_s covers every round's sampling and scoring
            col, scored, correct_B, metrics, rs = refill(run, rs, step, params)
            t2 = time.perf_counter()
        else:
            col, rs = collect(run, rs, step, params)
            t2 = time.perf_counter()
            scored, correct_B, metrics = score(run, col)
        times = {"rollout_s": t2 - t1, "reward_s": time.perf_counter() - t2}
        return col, scored, correct_B, metrics, rs, times | ({"weight_sync_s": t1 - t0} if params is not None else {})
    sync_s = pipe.fill(step, rs.train.params)
    got = pipe.take(step)
    order, sampler_params = pipe.checkpoint_state(step + 1)
    times = {"rollout_s": got.rollout_s, "reward_s": got.reward_s, "weight_sync_s": sync_s,
             "rollout_wait_s": time.perf_counter() - t0 - sync_s}
    metrics = got.metrics | {"rollout/version": got.version, "rollout/staleness": step - got.version}
    rs = dataclasses.replace(rs, order=order, sampler_params=sampler_params)
    return got.collected, got.scored, got.correct_B, metrics, rs, times


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


def assemble(run: Run, rs: RunState, scored: Scored) -> tuple[Batch, RunState, dict]:
    ref = (lambda t, m: run.ref_logprobs(rs.ref_params, t, m)) if run.algorithm.needs_reference else None  # noqa: E731
    values = (lambda t, m: run.critic_values(rs.train.params, t, m)) if run.algorithm.needs_values else None  # noqa: E731
    policy = ((lambda t, m: run.policy_logprobs(rs.train.params, t, m))  # noqa: E731
              if run.algorithm.needs_policy_logprobs else None)
    passes = Passes(reference=ref, values=values, policy=policy)
    batch, moments, metrics = run.algorithm.assemble(scored, passes, rs.moments)
    batch = jax.block_until_ready(shard_batch(batch, run.mesh))
    return batch, dataclasses.replace(rs, moments=moments), metrics


def update(run: Run, rs: RunState, batch: Batch, step: int) -> tuple[RunState, dict]:
    train, metrics = run.train_step(rs.train, batch)
    metrics = jax.device_get(metrics)
    if metrics["nonfinite"] > 0:
        raise NonFiniteLoss(
            f"step {step}: non-finite loss or gradient (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); the "
            f"update was refused and the run stopped. The last good checkpoint is intact in {run.ckpt.directory}")
    ref = rs.ref_params
    if run.refresh_ref and (step + 1) % run.cfg.train.ref_refresh_every == 0:
        ref = jax.tree.map(jnp.copy, train.params)  # the next step donates the params
    return dataclasses.replace(rs, train=train, ref_params=ref), metrics


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


def run_eval(run: Run, params, step: int) -> dict[str, float]:
    held_out = run.splits.held_out[: run.cfg.eval.num_examples]
    if not held_out:
        return {}
    cfg = run.cfg
    return evaluate(nnx.merge(run.graphdef, params), run.tokenizer, held_out, rewards=cfg.rewards,
                    correct_reward=cfg.correct_reward, max_new_tokens=cfg.rollout.max_new_tokens,
                    batch_prompts=cfg.eval.batch_prompts, pass_k=cfg.eval.pass_k, temperature=cfg.rollout.temperature,
                    pool=run.pool, mesh=run.mesh, min_prompt_bucket=run.prompt_bucket,
                    key=jax.random.fold_in(run.eval_key, step))


def train_one_step(run: Run, rs: RunState, step: int, first: bool,
                   pipe: RolloutPipeline | None = None) -> tuple[RunState, dict]:
    """collect -> score -> assemble -> update for step ``step`` (0-based), the first two from ``pipe`` when the
    rollouts run ahead; returns the state after it and the step's metrics."""
    t0 = time.perf_counter()
    col, scored, correct_B, metrics, rs, times = rollout_stage(run, rs, step, pipe)
    t2 = time.perf_counter()
    batch, rs, adv_metrics = assemble(run, rs, scored)
    t3 = time.perf_counter()
    if first and run.cfg.train.log_memory:
        metrics |= cost_metrics(run, rs.train, rs.ref_params, batch)
    t4 = time.perf_counter()
    rs, train_metrics = update(run, rs, batch, step)
    t5 = time.perf_counter()
    if rs.history is not None:
        rs.history.update(col.examples, col.sizes, correct_B, col.lengths_B[:col.n_valid])
    metrics = adv_metrics | step_metrics(col, scored, correct_B, rs) | metrics | {  # the rollout stage's win
        f"train/{k}": float(v) for k, v in train_metrics.items()}
    times |= {"prep_s": t3 - t2, "train_s": t5 - t4}
    metrics |= {f"time/{k}": v for k, v in times.items()} | {"time/step_s": time.perf_counter() - t0}
    return rs, metrics | throughput(run, col, batch, times) | (device_memory() if run.cfg.train.log_memory else {})


def throughput(run: Run, col: Collected, batch: Batch, times: dict[str, float]) -> dict[str, float]:
    """Tokens/s of the rollout and the update; each phase's model FLOP/s and MFU (``grpo_jax.perf``)."""
    tokens = float(to_host(batch.attn_mask_BxS.sum()))
    cfg = run.cfg
    return {"throughput/rollout_tok_s": col.lengths_B.sum() / times["rollout_s"],
            "throughput/train_tok_s": tokens / times["train_s"]} | step_throughput(
        run.model_config, times,
        prompt_len=col.rollout.prompt_BxP.shape[1], new_tokens_B=col.lengths_B, seq_tokens=tokens,
        seq_len=batch.tokens_BxS.shape[1], updates=cfg.train.num_iterations, reference=run.algorithm.needs_reference)


def record(run: Run, rs: RunState, done: int, metrics: dict, summary: dict) -> bool:
    """Evaluate when due, write the step's metrics, checkpoint when due; True when the run must stop (preempted)."""
    cfg = run.cfg
    if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
        metrics |= run_eval(run, rs.train.params, done)
    if done == cfg.train.steps:
        summary["final_eval"] = run_eval(run, rs.train.params, done)
        metrics |= summary["final_eval"]
    metrics["compiles"] = compile_count()  # last: everything this step ran is counted in this step
    run.writer.write(done, metrics)
    stop = run.preemption.should_stop(done)  # all processes save (a collective) and stop at the same step
    if done == cfg.train.steps or done % cfg.checkpoint.every == 0 or stop:
        run.writer.flush()  # the metrics up to a checkpoint are durable before it is
        rs.save(run.ckpt, done, wait=stop)
    return stop


def train(cfg: ExperimentConfig, run_dir, *, show_progress: bool = True, restart: bool = False) -> dict:
    """Run (or resume) the experiment in ``run_dir`` (a local path or ``gs://...``). Returns a summary with the
    first and last eval metrics. ``restart``: discard the run's checkpoints and metrics and start from step 0."""
    t_start = time.perf_counter()
    run, rs, start = build_run(cfg, run_dir, restart=restart)
    pipe = start_pipeline(run, rs, start)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="grpo", dynamic_ncols=True,
               disable=not (show_progress and is_primary()))
    try:
        summary: dict = {"start_step": start}
        if start == 0:
            summary["initial_eval"] = run_eval(run, rs.train.params, 0)
            run.writer.write(0, {**summary["initial_eval"], "compiles": compile_count()})
        for step in bar:
            rs, metrics = train_one_step(run, rs, step, first=step == start, pipe=pipe)
            bar.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            kl=f"{metrics.get('train/kl', 0.0):.4f}", len=f"{metrics['length/mean']:.0f}")
            if record(run, rs, step + 1, metrics, summary):
                raise Preempted(step + 1)
        run.ckpt.wait()
        if cfg.checkpoint.export_hf:
            export_hf(nnx.merge(run.graphdef, rs.train.params), run.run_dir / "final", run.tokenizer)
    finally:
        bar.close()
        if pipe is not None:
            pipe.close()
        run.close()
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
