"""The training loop: the only stateful code. data -> rollout -> rewards -> advantages -> train_step -> log/ckpt.

Everything random is derived from ``(cfg.seed, step)`` and the data order is a two-int state, so a run resumed
from a checkpoint replays exactly the steps an uninterrupted run would have taken.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from grpo_jax import config as config_lib
from grpo_jax.advantages import compute_advantages, kl_reward_advantages
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.critic import add_value_head, value_fn, with_gae
from grpo_jax.data import OrderState, batch_at, build_splits
from grpo_jax.evaluation import decode_completions, encode_prompts, evaluate
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.mesh import batch_size_multiple, shard_batch
from grpo_jax.multihost import any_process, is_primary, sync, to_host
from grpo_jax.objectives import PAIRED
from grpo_jax.rewards import RewardPool, dynamic_sampling_mask, resolve_rewards, reward_table
from grpo_jax.rollout import generate
from grpo_jax.run_setup import build_policy, export_hf, load_reference, load_tokenizer, logprob_fn, warm_start
from grpo_jax.tracking import MetricsWriter, compile_count
from grpo_jax.train_step import (
    Batch,
    StepConfig,
    TrainState,
    init_train_state,
    make_optimizer,
    make_train_step,
    state_sharding,
)

log = logging.getLogger(__name__)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of ``step`` was saved."""

    def __init__(self, step: int):
        super().__init__(f"SIGTERM: saved a checkpoint at step {step}")
        self.step = step


class NonFiniteLoss(RuntimeError):
    pass


def validate(cfg: ExperimentConfig, mesh) -> None:
    """Checks that need the devices; raise before any compute."""
    B, shards, m = cfg.train.batch_prompts * cfg.rollout.group_size, batch_size_multiple(mesh), cfg.train.micro_batches
    if B % m or (B // m) % shards:
        raise config_lib.ConfigError(
            f"train.batch_prompts * rollout.group_size = {B} sequences must split into train.micro_batches={m} "
            f"micro-batches that are each divisible by the mesh's data*fsdp = {shards}"
        )


def _write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Every process checks an existing config.yaml before process 0 (re)writes it."""
    path = run_dir / "config.yaml"
    text = config_lib.to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        raise config_lib.ConfigError(f"{path} holds a different config; resume with the same one or use a new --run-dir")
    sync("config checked")
    if is_primary():
        path.write_text(text)


def build_batch(ro, adv_B, ref_logprobs, keep_B, cfg: ExperimentConfig) -> Batch:
    """Prompt+completion arrays [B, S]; loss on completion tokens of kept rows only. ``ref_logprobs``
    ((tokens, mask) -> logps, or None when β = 0) scores the same concatenated sequences."""
    tokens = jnp.concatenate([ro.prompt_BxP, ro.completion_BxT], axis=1)
    attn = jnp.concatenate([ro.prompt_mask_BxP, ro.completion_mask_BxT], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(ro.prompt_mask_BxP), ro.completion_mask_BxT & keep_B[:, None]], axis=1)
    old_logp = jnp.concatenate([jnp.zeros(ro.prompt_BxP.shape, jnp.float32), ro.logprobs_BxT], axis=1)
    ref_logp = ref_logprobs(tokens, attn) if ref_logprobs is not None else None
    adv = adv_B
    if cfg.train.kl_in_reward:
        adv = kl_reward_advantages(adv_B, old_logp, ref_logp, loss_mask, cfg.algo.loss.beta)
        ref_logp = None
    return Batch(tokens_BxS=tokens, attn_mask_BxS=attn, loss_mask_BxS=loss_mask, old_logp_BxS=old_logp,
                 ref_logp_BxS=ref_logp, adv=adv)


def _length_stats(lengths_B: np.ndarray, correct_B: np.ndarray, finished_B: np.ndarray) -> dict[str, float]:
    out = {"length/mean": lengths_B.mean(), "length/max": lengths_B.max(), "length/clipped_frac": 1 - finished_B.mean()}
    for name, sel in (("correct", correct_B), ("incorrect", ~correct_B)):
        out[f"length/{name}_mean"] = lengths_B[sel].mean() if sel.any() else float("nan")
    return out


def train(cfg: ExperimentConfig, run_dir: str | Path, *, show_progress: bool = True) -> dict:
    """Run (or resume) the experiment in ``run_dir``. Returns a summary with the first and last eval metrics."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    try:
        mesh = cfg.mesh.build()
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e}") from None
    validate(cfg, mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, cfg)
    tokenizer = load_tokenizer(cfg.model)
    splits = build_splits(cfg.data, tokenizer)
    terms = resolve_rewards(cfg.rewards)
    pool = RewardPool(cfg.rewards.num_workers) if any(t.reward.isolated for t in terms) else None
    policy = build_policy(cfg, tokenizer, mesh)
    policy = warm_start(cfg, policy, tokenizer, splits.train, run_dir, mesh)
    kind = cfg.algo.kind
    if kind == "ppo":
        policy = add_value_head(policy, mesh)
    graphdef, params = nnx.split(policy)
    need_ref = cfg.algo.loss.beta > 0 or kind in PAIRED
    ref_graphdef, ref_params = load_reference(cfg, (graphdef, params), mesh) if need_ref else (graphdef, None)

    G, P = cfg.rollout.group_size, cfg.train.batch_prompts
    optimizer = make_optimizer(cfg.optim, cfg.train.steps * cfg.train.num_iterations)
    loss_cfg = cfg.algo.loss
    if loss_cfg.agg == "seq-mean-token-sum-norm" and loss_cfg.norm_len is None:
        loss_cfg = dataclasses.replace(loss_cfg, norm_len=float(cfg.rollout.max_new_tokens))
    if cfg.train.kl_in_reward:
        loss_cfg = dataclasses.replace(loss_cfg, beta=0.0)
    step_cfg = StepConfig(loss=loss_cfg, num_iterations=cfg.train.num_iterations, micro_batches=cfg.train.micro_batches,
                          temperature=cfg.rollout.temperature, logprob_chunk=cfg.train.logprob_chunk,
                          log_entropy=cfg.train.log_entropy, kind=kind,
                          ppo=cfg.algo.ppo if kind == "ppo" else None,
                          dpo=cfg.algo.dpo if kind in PAIRED else None,
                          group_size=G if kind in PAIRED else None)
    state = init_train_state(params, optimizer)
    train_step = make_train_step(graphdef, optimizer, step_cfg, state_sharding=state_sharding(state))
    ref_logprobs = logprob_fn(ref_graphdef, cfg.rollout.temperature, cfg.train.logprob_chunk, cfg.train.micro_batches)
    critic_values = value_fn(graphdef) if kind == "ppo" else None

    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    refresh = cfg.train.ref_refresh_every is not None and need_ref
    tree = lambda st, ref: {"train": st, "ref": ref} if refresh else {"train": st}  # noqa: E731
    start, order = 0, OrderState()
    restored = ckpt.restore_latest(abstract_like(tree(state, ref_params)))
    if restored is not None:
        start, saved, meta = restored
        state = saved["train"]
        ref_params = saved["ref"] if refresh else ref_params
        order = OrderState(**meta["order"])
        log.info("resumed from the checkpoint at step %d", start)
    writer = MetricsWriter(run_dir)
    writer.truncate_after(start)

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    base_key, eval_base_key = jax.random.split(jax.random.key(cfg.seed))
    eval_kw = dict(rewards=cfg.rewards, correct_reward=cfg.correct_reward, max_new_tokens=cfg.rollout.max_new_tokens,
                   batch_prompts=cfg.eval.batch_prompts, pass_k=cfg.eval.pass_k, temperature=cfg.rollout.temperature,
                   pool=pool, mesh=mesh, min_prompt_bucket=cfg.rollout.min_prompt_bucket)
    held_out = splits.held_out[: cfg.eval.num_examples]

    def run_eval(step: int) -> dict[str, float]:
        if not held_out:
            return {}
        model = nnx.merge(graphdef, state.params)
        return evaluate(model, tokenizer, held_out, key=jax.random.fold_in(eval_base_key, step), **eval_kw)

    preempted = []
    old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    summary: dict = {"start_step": start}
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               disable=not (show_progress and is_primary()), desc="grpo", dynamic_ncols=True)
    try:
        if start == 0:
            first = run_eval(0)
            summary["initial_eval"] = first
            writer.write(0, {**first, "compiles": compile_count()})
        for step in bar:
            t0 = time.perf_counter()
            key = jax.random.fold_in(base_key, step)
            examples, order = batch_at(splits.train, order, batch_size=P, seed=cfg.data.seed)
            ro = generate(nnx.merge(graphdef, state.params), encode_prompts(tokenizer, examples),
                          max_new_tokens=cfg.rollout.max_new_tokens, num_samples=G, temperature=cfg.rollout.temperature,
                          top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                          rng=key, min_prompt_bucket=cfg.rollout.min_prompt_bucket, mesh=mesh)
            lengths = to_host(ro.lengths_B)
            t_rollout = time.perf_counter() - t0

            rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
            rewards_B, values, metrics = reward_table(cfg.rewards, rep([e["prompt"] for e in examples]),
                                                      decode_completions(tokenizer, ro), rep(examples),
                                                      group_size=G, lengths_B=lengths, pool=pool)
            t_reward = time.perf_counter() - t0 - t_rollout
            adv_B = compute_advantages(jnp.asarray(rewards_B), G, cfg.algo.advantage)
            keep_B = dynamic_sampling_mask(rewards_B, G) if cfg.train.dynamic_sampling else jnp.ones(P * G, bool)
            ref_fn = (lambda t, m: ref_logprobs(ref_params, t, m)) if need_ref else None  # noqa: E731
            batch = build_batch(ro, adv_B, ref_fn, keep_B, cfg)
            if kind == "ppo":
                batch = with_gae(batch, rewards_B, critic_values, state.params, cfg.algo.ppo)
            elif kind in PAIRED:
                batch = batch.replace(rewards_B=jnp.asarray(rewards_B, jnp.float32))
            batch = shard_batch(batch, mesh)
            t1 = time.perf_counter()
            state, train_metrics = train_step(state, batch)
            train_metrics = jax.device_get(train_metrics)
            t_train = time.perf_counter() - t1
            if train_metrics["nonfinite"] > 0:
                raise NonFiniteLoss(
                    f"step {step}: non-finite loss or gradient (loss={train_metrics['loss']}, grad_norm="
                    f"{train_metrics['grad_norm']}); the update was refused and the run stopped. The last good "
                    f"checkpoint is intact in {ckpt.directory}"
                )
            if refresh and (step + 1) % cfg.train.ref_refresh_every == 0:
                ref_params = jax.tree.map(jnp.copy, state.params)  # the next step donates state.params

            correct_B = values[cfg.correct_reward] > 0
            adv = np.asarray(adv_B) if kind != "ppo" else to_host(batch.adv)[to_host(batch.loss_mask_BxS)]
            metrics |= {f"train/{k}": float(v) for k, v in train_metrics.items()}
            metrics |= _length_stats(lengths, correct_B, to_host(ro.finished_B))
            metrics |= {
                "accuracy": correct_B.mean(), "adv/mean": adv.mean(), "adv/std": adv.std(), "adv/abs_mean": np.abs(adv).mean(),
                "kept_frac": float(np.asarray(keep_B).mean()),
                "shape/prompt_len": ro.prompt_BxP.shape[1],
                "time/rollout_s": t_rollout, "time/reward_s": t_reward, "time/train_s": t_train,
                "throughput/rollout_tok_s": lengths.sum() / t_rollout,
                "throughput/train_tok_s": float(to_host(batch.attn_mask_BxS.sum())) / t_train,
            }
            done = step + 1
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                metrics |= run_eval(done)
            if done == cfg.train.steps:
                summary["final_eval"] = run_eval(done)
                metrics |= summary["final_eval"]
            metrics["compiles"] = compile_count()  # last: everything this step ran is counted in this step
            writer.write(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            kl=f"{train_metrics.get('kl', 0.0):.4f}", len=f"{lengths.mean():.0f}")
            meta = {"order": {"epoch": order.epoch, "position": order.position}}
            stop = any_process(bool(preempted))  # all processes save (a collective) and stop at the same step
            if done == cfg.train.steps or done % cfg.checkpoint.every == 0 or stop:
                ckpt.save(done, tree(state, ref_params), meta, wait=stop)
            if stop:
                raise Preempted(done)
        ckpt.wait()
        if cfg.checkpoint.export_hf:
            export_hf(nnx.merge(graphdef, state.params), run_dir / "final", tokenizer)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bar.close()
        writer.close()
        ckpt.close()
        if pool is not None:
            pool.close()
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
