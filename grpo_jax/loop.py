"""The training loop: the only stateful code. data -> rollout -> rewards -> advantages -> train_step -> log/ckpt.

Everything random is derived from ``(cfg.seed, step)`` and the data order is a two-int state, so a run resumed
from a checkpoint replays exactly the steps an uninterrupted run would have taken.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from grpo_jax import config as config_lib
from grpo_jax import storage
from grpo_jax.advantages import (
    RunningMoments,
    compute_advantages,
    compute_advantages_with_state,
    kl_reward_advantages,
    multiscale_advantages,
    reward_to_go,
)
from grpo_jax.checkpoint import Checkpointer, PreemptionWatch, abstract_like, start_over
from grpo_jax.critic import add_value_head, value_fn, with_gae
from grpo_jax.data import OrderState, batch_at, build_splits
from grpo_jax.evaluation import accuracy_by_level, decode_completions, encode_prompts, evaluate
from grpo_jax.group_size import GroupHistory, rollout_rows
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.mesh import batch_size_multiple, shard_batch
from grpo_jax.multihost import is_primary, sync, to_host
from grpo_jax.objectives import PAIRED
from grpo_jax.rewards import RewardPool, dynamic_sampling_mask, resolve_rewards, reward_table
from grpo_jax.rollout import generate
from grpo_jax.run_setup import build_policy, export_hf, load_reference, load_tokenizer, logprob_fn, warm_start
from grpo_jax.tracking import MetricsWriter, compile_count, compiled_stats, device_memory, tree_bytes
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
    """The machine is going away (SIGTERM, or JAX's preemption notice); a checkpoint of ``step`` was saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}")
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


def _write_config(run_dir: storage.Location, cfg: ExperimentConfig) -> None:
    """Every process checks an existing config.yaml before process 0 (re)writes it."""
    path = run_dir / "config.yaml"
    text = config_lib.to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        raise config_lib.ConfigError(f"{path} holds a different config; resume with the same one or use a new --run-dir")
    sync("config checked")
    if is_primary():
        path.write_text(text)


def build_batch(ro, adv_B, ref_logprobs, keep_B, cfg: ExperimentConfig, group_ids_B=None) -> Batch:
    """Prompt+completion arrays [B, S]; loss on completion tokens of kept rows only. ``ref_logprobs``
    ((tokens, mask) -> logps, or None when no reference is needed) scores the same concatenated sequences.
    ``algo.advantage.token_alpha`` > 0 adds the KL return-to-go, A_it = A_i + α·ã_it with ã from
    u_it = -Σ_{t'>=t} (logp_it' - ref_it') (``multiscale_advantages``, normalised by ``token_norm``)."""
    tokens = jnp.concatenate([ro.prompt_BxP, ro.completion_BxT], axis=1)
    attn = jnp.concatenate([ro.prompt_mask_BxP, ro.completion_mask_BxT], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(ro.prompt_mask_BxP), ro.completion_mask_BxT & keep_B[:, None]], axis=1)
    old_logp = jnp.concatenate([jnp.zeros(ro.prompt_BxP.shape, jnp.float32), ro.logprobs_BxT], axis=1)
    ref_logp = ref_logprobs(tokens, attn) if ref_logprobs is not None else None
    adv = adv_B
    if cfg.train.kl_in_reward:
        adv = kl_reward_advantages(adv_B, old_logp, ref_logp, loss_mask, cfg.algo.loss.beta)
        ref_logp = None
    adv_cfg = cfg.algo.advantage
    if adv_cfg.token_alpha > 0:
        k1 = jnp.where(loss_mask, old_logp - ref_logp, 0.0)
        groups = (dict(group_size=None, group_ids_B=group_ids_B, num_groups=cfg.train.batch_prompts)
                  if group_ids_B is not None else dict(group_size=cfg.rollout.group_size))
        adv = multiscale_advantages(adv, -reward_to_go(k1, loss_mask), loss_mask, alpha=adv_cfg.token_alpha,
                                    normalize=adv_cfg.token_norm, **groups)
        ref_logp = ref_logp if cfg.algo.loss.beta > 0 else None
    return Batch(tokens_BxS=tokens, attn_mask_BxS=attn, loss_mask_BxS=loss_mask, old_logp_BxS=old_logp,
                 ref_logp_BxS=ref_logp, adv=adv)


def _length_stats(lengths_B: np.ndarray, correct_B: np.ndarray, finished_B: np.ndarray) -> dict[str, float]:
    out = {"length/mean": lengths_B.mean(), "length/max": lengths_B.max(), "length/clipped_frac": 1 - finished_B.mean()}
    for name, sel in (("correct", correct_B), ("incorrect", ~correct_B)):
        out[f"length/{name}_mean"] = lengths_B[sel].mean() if sel.any() else float("nan")
    return out


def _cost_metrics(train_step, state, batch, ref_logprobs, ref_params, critic_values) -> dict[str, float]:
    """``train.log_memory``: memory of the compiled train step and of the extra passes a kind makes per rollout batch
    (the reference's log-probs, PPO's old values), and the bytes of the reference params it holds."""
    out = compiled_stats(train_step, state, batch, name="train_step")
    tokens, attn = batch.tokens_BxS, batch.attn_mask_BxS
    if ref_logprobs is not None:
        out |= compiled_stats(ref_logprobs, ref_params, tokens, attn, name="reference_pass")
        out["memory/reference_params_bytes"] = tree_bytes(ref_params)
    if critic_values is not None:
        out |= compiled_stats(critic_values, state.params, tokens, attn, name="value_pass")
    return out


def train(cfg: ExperimentConfig, run_dir, *, show_progress: bool = True, restart: bool = False) -> dict:
    """Run (or resume) the experiment in ``run_dir`` (a local path or ``gs://...``). Returns a summary with the
    first and last eval metrics. ``restart``: discard the run's checkpoints and metrics and start from step 0."""
    t_start = time.perf_counter()
    run_dir = storage.location(run_dir)
    try:
        mesh = cfg.mesh.build()
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e}") from None
    validate(cfg, mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, cfg)
    if restart:
        start_over(run_dir)
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
    need_ref = cfg.algo.loss.beta > 0 or kind in PAIRED or cfg.algo.advantage.token_alpha > 0
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
                          group_size=G if kind in PAIRED else None, grad_variance=cfg.train.grad_variance)
    state = init_train_state(params, optimizer)
    train_step = make_train_step(graphdef, optimizer, step_cfg, state_sharding=state_sharding(state))
    ref_logprobs = logprob_fn(ref_graphdef, cfg.rollout.temperature, cfg.train.logprob_chunk, cfg.train.micro_batches)
    critic_values = value_fn(graphdef) if kind == "ppo" else None

    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    refresh = cfg.train.ref_refresh_every is not None and need_ref
    adv_cfg, dyn = cfg.algo.advantage, cfg.rollout.dynamic_group
    moments = RunningMoments.zeros()  # running reward moments (baseline/scale "running"), checkpointed when used

    def tree(st, ref, mom):
        return {"train": st} | ({"ref": ref} if refresh else {}) | ({"adv": mom} if adv_cfg.stateful else {})

    start, order = 0, OrderState()
    history = GroupHistory(dyn) if dyn is not None else None
    restored = ckpt.restore_latest(abstract_like(tree(state, ref_params, moments)))
    if restored is not None:
        start, saved, meta = restored
        state = saved["train"]
        ref_params = saved["ref"] if refresh else ref_params
        moments = saved["adv"] if adv_cfg.stateful else moments
        order = OrderState(**meta["order"])
        history = GroupHistory.from_json(dyn, meta["groups"]) if dyn is not None else None
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

    preemption = PreemptionWatch(ckpt)
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
            rows, sizes, n_valid, ids_B = rollout_rows(examples, G, history, cfg.rollout.max_new_tokens)
            ro = generate(nnx.merge(graphdef, state.params), encode_prompts(tokenizer, examples if dyn is None else rows),
                          max_new_tokens=cfg.rollout.max_new_tokens, num_samples=G if dyn is None else 1,
                          temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                          eos_ids=eos, pad_id=tokenizer.pad_token_id, rng=key,
                          min_prompt_bucket=cfg.rollout.min_prompt_bucket, mesh=mesh)
            lengths = to_host(ro.lengths_B)
            t_rollout = time.perf_counter() - t0

            valid = slice(0, n_valid)
            rewards_B, values, metrics = reward_table(cfg.rewards, [e["prompt"] for e in rows[valid]],
                                                      decode_completions(tokenizer, ro)[valid], rows[valid],
                                                      group_size=G if dyn is None else 1, lengths_B=lengths[valid],
                                                      pool=pool)
            t_reward = time.perf_counter() - t0 - t_rollout
            rewards_B = np.pad(rewards_B, (0, P * G - n_valid))
            ragged = dict(group_ids_B=None if ids_B is None else jnp.asarray(ids_B), num_groups=P if dyn else None)
            group = G if dyn is None else None
            if adv_cfg.stateful:
                adv_B, moments = compute_advantages_with_state(jnp.asarray(rewards_B), group, adv_cfg, moments, **ragged)
            else:
                adv_B = compute_advantages(jnp.asarray(rewards_B), group, adv_cfg, **ragged)
            keep_B = dynamic_sampling_mask(rewards_B, G) if cfg.train.dynamic_sampling else jnp.ones(P * G, bool)
            keep_B = keep_B & (jnp.arange(P * G) < n_valid)
            ref_fn = (lambda t, m: ref_logprobs(ref_params, t, m)) if need_ref else None  # noqa: E731
            batch = build_batch(ro, adv_B, ref_fn, keep_B, cfg, ragged["group_ids_B"])
            if kind == "ppo":
                batch = with_gae(batch, rewards_B, critic_values, state.params, cfg.algo.ppo)
            elif kind in PAIRED:
                batch = batch.replace(rewards_B=jnp.asarray(rewards_B, jnp.float32))
            batch = jax.block_until_ready(shard_batch(batch, mesh))
            t_prep = time.perf_counter() - t0 - t_rollout - t_reward
            if cfg.train.log_memory and step == start:
                metrics |= _cost_metrics(train_step, state, batch, ref_logprobs if need_ref else None, ref_params,
                                         critic_values)
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
            if kind == "ppo" or adv_cfg.token_alpha > 0:
                adv = to_host(batch.adv)[to_host(batch.loss_mask_BxS)]
            else:
                adv = np.asarray(adv_B)[:n_valid]
            metrics |= {f"train/{k}": float(v) for k, v in train_metrics.items()}
            metrics |= _length_stats(lengths[valid], correct_B, to_host(ro.finished_B)[valid])
            metrics |= accuracy_by_level(correct_B, rows[valid], "accuracy")
            if dyn is not None:
                history.update(examples, sizes, correct_B, lengths[valid])
                solved = [np.ptp(r) == 0 for r in np.split(rewards_B[valid], np.cumsum(sizes)[:-1])]
                metrics |= {"group/size_min": sizes.min(), "group/size_max": sizes.max(), "group/rows_used": n_valid,
                            "reward/zero_variance_fraction": float(np.mean(solved))}
            if adv_cfg.stateful:
                metrics |= {"adv/running_mean": float(moments.mean), "adv/running_std": float(np.sqrt(moments.var))}
            metrics |= {
                "accuracy": correct_B.mean(), "adv/mean": adv.mean(), "adv/std": adv.std(), "adv/abs_mean": np.abs(adv).mean(),
                "kept_frac": float(np.asarray(keep_B).mean()),
                "shape/prompt_len": ro.prompt_BxP.shape[1],
                "time/rollout_s": t_rollout, "time/reward_s": t_reward, "time/prep_s": t_prep, "time/train_s": t_train,
                "time/step_s": time.perf_counter() - t0,
                "throughput/rollout_tok_s": lengths.sum() / t_rollout,
                "throughput/train_tok_s": float(to_host(batch.attn_mask_BxS.sum())) / t_train,
            }
            metrics |= device_memory() if cfg.train.log_memory else {}
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
            if history is not None:
                meta["groups"] = history.to_json()
            stop = preemption.should_stop(done)  # all processes save (a collective) and stop at the same step
            if done == cfg.train.steps or done % cfg.checkpoint.every == 0 or stop:
                writer.flush()  # the metrics up to a checkpoint are durable before it is
                ckpt.save(done, tree(state, ref_params, moments), meta, wait=stop)
            if stop:
                raise Preempted(done)
        ckpt.wait()
        if cfg.checkpoint.export_hf:
            export_hf(nnx.merge(graphdef, state.params), run_dir / "final", tokenizer)
    finally:
        preemption.close()
        bar.close()
        writer.close()
        ckpt.close()
        if pool is not None:
            pool.close()
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
