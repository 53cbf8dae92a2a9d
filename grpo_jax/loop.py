"""The training loop, the only stateful code: five stages with typed records between them,

    collect (rollout) -> score (rewards) -> assemble (the algorithm's batch) -> update (the jitted step) -> record

(the first two in ``grpo_jax.sampling``) and one ``RunState`` holding everything a checkpoint saves. Everything
random is derived from ``(cfg.seed, step)`` and the data order is a two-int state, so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would have taken. The loop knows no algorithm by name:
``grpo_jax.algorithms`` does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from grpo_jax import sampling
from grpo_jax.algorithms import Passes, Scored
from grpo_jax.evaluation import evaluate
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.mechanisms import mechanism_metrics
from grpo_jax.mesh import shard_batch
from grpo_jax.multihost import is_primary, to_host
from grpo_jax.perf import step_throughput
from grpo_jax.pipeline import RolloutPipeline, sampler_slots
from grpo_jax.run import Run, build_run, cost_metrics
from grpo_jax.run_setup import frozen_copy
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


def start_pipeline(run: Run, rs: RunState, start: int) -> RolloutPipeline | None:
    """The rollout pipeline of ``rollout.mode`` one_step_off/async, resuming with the checkpoint's sampler params."""
    depth, cfg = run.cfg.rollout.depth, run.cfg
    if cfg.rollout.mode == "sync":
        return None
    snapshots = dict(zip(sampler_slots(depth, start), rs.sampler_params)) if start > 0 else {}
    return RolloutPipeline(functools.partial(sampling.produce, run), run.sampler_params, depth=depth, start=start,
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
            col, scored, correct_B, metrics, rs = sampling.refill(run, rs, step, params)
            t2 = time.perf_counter()
        else:
            col, rs = sampling.collect(run, rs, step, params)
            t2 = time.perf_counter()
            scored, correct_B, metrics = sampling.score(run, col)
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


def assemble(run: Run, rs: RunState, scored: Scored) -> tuple[Batch, RunState, dict]:
    ref = (lambda t, m: run.ref_logprobs(run.reference_params(rs), t, m)) if run.algorithm.needs_reference else None  # noqa: E731
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
        ref = frozen_copy(train.params, run.cfg.model.dtype)
    return dataclasses.replace(rs, train=train, ref_params=ref), metrics


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
        metrics |= cost_metrics(run, rs, batch)
    t4 = time.perf_counter()
    rs, train_metrics = update(run, rs, batch, step)
    t5 = time.perf_counter()
    if rs.history is not None:
        rs.history.update(col.examples, col.sizes, correct_B, col.lengths_B[:col.n_valid])
    metrics = adv_metrics | sampling.step_metrics(col, scored, correct_B, rs) | metrics | {  # the rollout stage's win
        f"train/{k}": float(v) for k, v in train_metrics.items()} | mechanisms(run, col, batch, correct_B)
    times |= {"prep_s": t3 - t2, "train_s": t5 - t4}
    metrics |= {f"time/{k}": v for k, v in times.items()} | {"time/step_s": time.perf_counter() - t0}
    return rs, metrics | throughput(run, col, batch, times) | (device_memory() if run.cfg.train.log_memory else {})


def mechanisms(run: Run, col: sampling.Collected, batch: Batch, correct_B: np.ndarray) -> dict[str, float]:
    """``mech/*``: the batch's effective per-token weights by answer correctness and length, and their share per
    difficulty level (``grpo_jax.mechanisms``)."""
    rows = col.rows[:col.n_valid]
    levels = [r["level"] for r in rows] if rows and "level" in rows[0] else None
    loss = run.algorithm.loss
    return mechanism_metrics(to_host(batch.adv), to_host(batch.loss_mask_BxS), loss.agg, loss.norm_len, correct_B,
                             levels)  # to_host: on several hosts the batch is a global array


def throughput(run: Run, col: sampling.Collected, batch: Batch, times: dict[str, float]) -> dict[str, float]:
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
            run.export(rs.train.params)
    finally:
        bar.close()
        if pipe is not None:
            pipe.close()
        run.close()
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
