"""``Run``: the parts of a training run that stay fixed while it runs (config, mesh, data, rewards, the algorithm,
the compiled step and passes, checkpoints, metrics), built once by ``build_run`` with the restored ``RunState``."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import storage
from grpo_jax.advantages import RunningMoments
from grpo_jax.algorithms import Algorithm, build_algorithm
from grpo_jax.checkpoint import Checkpointer, PreemptionWatch, start_over
from grpo_jax.critic import value_fn
from grpo_jax.data import OrderState, build_splits
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.group_size import GroupHistory
from grpo_jax.layout import Layout, planned_step
from grpo_jax.mesh import batch_size_multiple, logical_sharding, model_shardings
from grpo_jax.models import ModelConfig, lora
from grpo_jax.multihost import is_primary, sync, to_host
from grpo_jax.optim import make_optimizer
from grpo_jax.rewards import RewardPool, resolve_rewards
from grpo_jax.run_setup import (
    build_meshes,
    build_policy,
    export_hf,
    load_model,
    load_reference,
    load_tokenizer,
    logprob_fn,
    prompt_bucket,
    resolve_layout,
    warm_start,
    write_config,
)
from grpo_jax.run_state import RunState
from grpo_jax.tracking import MetricsWriter, compiled_stats, tree_bytes
from grpo_jax.train_step import StepConfig, contiguous_split, init_train_state, make_train_step, state_sharding


@dataclasses.dataclass
class Run:
    cfg: ExperimentConfig
    run_dir: storage.Location
    mesh: Any
    tokenizer: Any
    splits: Any
    terms: tuple
    pool: RewardPool | None
    graphdef: nnx.GraphDef
    algorithm: Algorithm
    train_step: Any  # jitted (TrainState, Batch) -> (TrainState, metrics)
    ref_logprobs: Any  # jitted (ref params, tokens, attn) -> log-probs
    critic_values: Any  # jitted (params, tokens, attn) -> values, for algorithms that need them
    policy_logprobs: Any  # jitted (params, tokens, attn) -> the trainer's log-probs, for algorithms that need them
    ckpt: Checkpointer
    key: jax.Array  # per-step rollout keys are fold_in(key, step)
    eval_key: jax.Array
    eos_ids: list[int]
    model_config: ModelConfig
    prompt_bucket: int  # generate's min_prompt_bucket (rollout.fixed_prompt_len: the longest training prompt)
    base_graphdef: nnx.GraphDef | None = None  # model.lora: the policy without adapters (reference pass, export)
    sampler_graphdef: nnx.GraphDef | None = None  # what samples: the policy (LoRA: the base) in rollout.dtype
    sampler_mesh: Any = None  # rollout.mesh built (None: the sampler uses ``mesh``)
    sampler_shardings: Any = None  # the params' shardings on sampler_mesh
    writer: MetricsWriter | None = None
    preemption: PreemptionWatch | None = None

    @property
    def separate_sampler(self) -> bool:
        """Whether the sampler's params differ from the trainer's (``rollout.dtype``, ``rollout.mesh`` or
        ``model.lora`` set)."""
        return self.cfg.rollout.dtype is not None or self.sampler_mesh is not None or self.merged_sampler

    @property
    def merged_sampler(self) -> bool:
        """LoRA with ``rollout.merge_lora``: the sampler runs the base model with the adapters merged in."""
        return self.base_graphdef is not None and self.cfg.rollout.merge_lora

    def sampler_params(self, params):
        """The weight sync: a copy of the trainer's ``params`` for the sampler, with LoRA's adapters merged into the
        base weights (``rollout.merge_lora``), cast to ``rollout.dtype`` and resharded onto ``rollout.mesh`` (when
        set: the params' logical axes under the one rules table, on the sampler's devices)."""
        dtype, fresh = self.cfg.rollout.dtype, self.merged_sampler
        if fresh:
            params = _merge(params, self.model_config)  # new buffers, as the copy below would be
        params = jax.tree.map(lambda x: x.astype(dtype) if dtype is not None and x.dtype != dtype
                              else x if fresh else jnp.copy(x), params)
        return params if self.sampler_mesh is None else jax.device_put(params, self.sampler_shardings)

    def sampler_shapes(self, params):
        """The shapes, dtypes and shardings of ``sampler_params(params)`` (a checkpoint's restore target)."""
        params = lora.base_state(params) if self.merged_sampler else params
        dtype = self.cfg.rollout.dtype
        shardings = (jax.tree.map(lambda x: x.sharding, params) if self.sampler_mesh is None
                     else self.sampler_shardings)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), params,
                            shardings)

    def to_trainer(self, tree):
        """Arrays the sampler made (on ``rollout.mesh``) moved onto the trainer's mesh, rows split over its batch
        axes where they divide (else replicated); unchanged without a sampler mesh."""
        if self.sampler_mesh is None:
            return tree
        shards = batch_size_multiple(self.mesh)

        def put(x):
            axes = [None] * x.ndim
            if x.ndim and x.shape[0] % shards == 0:
                axes[0] = "batch"
            return jax.device_put(x, logical_sharding(self.mesh, axes))

        return jax.tree.map(put, tree)

    def reference_params(self, rs: RunState):
        """The reference pass's params: with LoRA (and no model.ref_path) the policy's own base weights, the adapter
        off (the same arrays: no copy); else the frozen reference's."""
        if self.base_graphdef is not None and self.cfg.model.ref_path is None:
            return lora.base_state(rs.train.params)
        return rs.ref_params

    def export(self, params) -> None:
        """``run_dir/final``: the policy as an HF folder, with LoRA its adapters merged in; with LoRA also
        ``run_dir/final_adapter``, a PEFT adapter folder over its base: the warm start's folder, ``model.path``, or
        for a random init ``run_dir/final_base``, written here."""
        if self.base_graphdef is None:
            export_hf(nnx.merge(self.graphdef, params), self.run_dir / "final", self.tokenizer)
            return
        model_cfg = self.model_config
        export_hf(nnx.merge(self.base_graphdef, lora.merged_state(params, model_cfg)), self.run_dir / "final",
                  self.tokenizer)
        base = self.run_dir / "warm_start" if self.cfg.warm_start is not None else self.cfg.model.path
        if base is None:
            base = self.run_dir / "final_base"
            export_hf(nnx.merge(self.base_graphdef, lora.base_state(params)), base, self.tokenizer)
        adapters = jax.tree.map(to_host, nnx.filter_state(params, nnx.LoRAParam))
        if is_primary():
            lora.save_peft(adapters, model_cfg, self.run_dir / "final_adapter", str(base))
        sync("export_adapter")

    @property
    def refresh_ref(self) -> bool:
        return self.cfg.train.ref_refresh_every is not None and self.algorithm.needs_reference

    def close(self) -> None:
        for part in (self.preemption, self.writer, self.ckpt, self.pool):
            if part is not None:
                part.close()


def _step(cfg: ExperimentConfig, algorithm: Algorithm, graphdef, params, mesh):
    """(initial TrainState, jitted train step of the algorithm's objective, its ``train.layout`` or None when
    padded). A packed layout's step plans each batch's rows on the host (``grpo_jax.layout.planned_step``)."""
    optimizer = make_optimizer(cfg.optim, cfg.train.steps * cfg.train.num_iterations,
                               critic=algorithm.critic_optim(cfg.optim))
    step_cfg = StepConfig(num_iterations=cfg.train.num_iterations, micro_batches=cfg.train.micro_batches,
                          temperature=cfg.rollout.temperature, logprob_chunk=cfg.train.logprob_chunk,
                          log_entropy=cfg.train.log_entropy, grad_variance=cfg.train.grad_variance,
                          frozen=None if cfg.model.lora is None else lora.frozen)
    state = init_train_state(params, optimizer, master=bool(cfg.model.master_weights), frozen=step_cfg.frozen)
    step = make_train_step(graphdef, optimizer, step_cfg, algorithm, state_sharding=state_sharding(state))
    if cfg.train.layout == "padded":
        return state, step, None
    layout = Layout(kind=cfg.train.layout, group_size=cfg.rollout.group_size, micro_batches=step_cfg.micro_batches,
                    contiguous=contiguous_split(algorithm, step_cfg), blocks=batch_size_multiple(mesh),
                    new_tokens=cfg.rollout.max_new_tokens)
    return state, planned_step(step, layout, mesh), layout


def build_run(cfg: ExperimentConfig, run_dir, *, restart: bool = False) -> tuple[Run, RunState, int]:
    """(run, its state restored from the newest checkpoint, the step it starts at). Config errors are raised before
    any compute; nothing in ``run_dir`` but ``config.yaml`` (and a warm start) is written before the restore."""
    mesh, sampler_mesh = build_meshes(cfg)
    run_dir = storage.location(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    if restart:
        start_over(run_dir)
    tokenizer, algorithm = load_tokenizer(cfg.model), build_algorithm(cfg)
    splits, terms = build_splits(cfg.data, tokenizer), resolve_rewards(cfg.rewards)
    cfg = resolve_layout(cfg, algorithm, tokenizer, splits.train)
    policy = warm_start(cfg, build_policy(cfg, tokenizer, mesh), tokenizer, splits.train, run_dir, mesh)
    bare = nnx.split(policy)  # the reference copies the policy alone, not what the algorithm trains beside it
    if cfg.model.lora is not None:
        policy = lora.attach(policy, cfg.model.lora, cfg.seed, mesh)
    prepared = algorithm.prepare_policy(policy, mesh, load=lambda path: load_model(path, cfg, mesh))
    graphdef, params = nnx.split(prepared)
    free_ref = cfg.model.lora is not None and cfg.model.ref_path is None  # the base weights, adapter off
    ref_graphdef, ref_params = (graphdef, None) if not algorithm.needs_reference else (
        (bare[0], None) if free_ref else load_reference(cfg, bare, mesh))
    state, train_step, layout = _step(cfg, algorithm, graphdef, params, mesh)
    ref_logprobs = logprob_fn(ref_graphdef, cfg.rollout.temperature, cfg.train.logprob_chunk, cfg.train.micro_batches,
                              layout, mesh)
    policy_logprobs = None
    if algorithm.needs_policy_logprobs:  # the reference's pass when it is a copy of the policy (same graphdef)
        policy_logprobs = ref_logprobs if ref_graphdef == graphdef else logprob_fn(
            graphdef, cfg.rollout.temperature, cfg.train.logprob_chunk, cfg.train.micro_batches, layout, mesh)
    # what the sampler runs: the policy, or under LoRA the base model with the adapters merged in
    merged = cfg.model.lora is not None and cfg.rollout.merge_lora
    sampled = (bare[0], lora.base_state(params)) if merged else (graphdef, params)
    key, eval_key = jax.random.split(jax.random.key(cfg.seed))
    run = Run(cfg=cfg, run_dir=run_dir, mesh=mesh, tokenizer=tokenizer, splits=splits, terms=terms,
              pool=RewardPool(cfg.rewards.num_workers) if any(t.reward.isolated for t in terms) else None,
              graphdef=graphdef, algorithm=algorithm, train_step=train_step,
              ref_logprobs=ref_logprobs, policy_logprobs=policy_logprobs,
              critic_values=value_fn(graphdef) if algorithm.needs_values else None,
              ckpt=Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save),
              key=key, eval_key=eval_key, eos_ids=[] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id],
              model_config=policy.config, prompt_bucket=prompt_bucket(cfg, tokenizer, splits.train),
              base_graphdef=None if cfg.model.lora is None else bare[0],
              sampler_graphdef=sampler_graphdef(*sampled, cfg.rollout.dtype), sampler_mesh=sampler_mesh,
              sampler_shardings=None if sampler_mesh is None else model_shardings(sampled[1], sampler_mesh))
    dyn = cfg.rollout.dynamic_group
    rs = RunState(train=state, ref_params=ref_params, moments=RunningMoments.zeros(), order=OrderState(),
                  history=None if dyn is None else GroupHistory(dyn), keep_ref=run.refresh_ref,
                  keep_moments=algorithm.stateful, frozen=None if cfg.model.lora is None else lora.frozen,
                  sampler_params=(run.sampler_shapes(state.params),) * cfg.rollout.depth)  # restore fills them in
    try:
        start, rs = rs.restore(run.ckpt)
        run.writer = MetricsWriter(run_dir)
        run.writer.truncate_after(start)
        run.preemption = PreemptionWatch(run.ckpt)
    except BaseException:
        run.close()
        raise
    return run, rs, start


@functools.partial(jax.jit, static_argnums=1)
def _merge(params, model_config: ModelConfig):
    return lora.merged_state(params, model_config)


def sampler_graphdef(graphdef: nnx.GraphDef, params, dtype: str | None) -> nnx.GraphDef:
    """``graphdef`` with every model config's ``dtype`` and ``param_dtype`` set to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return graphdef
    model = nnx.merge(graphdef, params)
    for _, module in nnx.iter_modules(model):
        if isinstance(getattr(module, "config", None), ModelConfig):
            module.config = dataclasses.replace(module.config, dtype=dtype, param_dtype=dtype)
    return nnx.split(model)[0]


def cost_metrics(run: Run, rs: RunState, batch) -> dict[str, float]:
    """``train.log_memory``: memory of the compiled train step and of the extra passes the algorithm makes per
    rollout batch (the reference's log-probs, the critic's values, the trainer's log-probs), and the bytes of the
    reference params it holds."""
    state = rs.train
    out = compiled_stats(run.train_step, state, batch, name="train_step")
    tokens, attn = batch.tokens_BxS, batch.attn_mask_BxS
    if run.algorithm.needs_reference:
        out |= compiled_stats(run.ref_logprobs, run.reference_params(rs), tokens, attn, name="reference_pass")
        # a reference held beside the policy (0 under LoRA: the policy's base weights are the reference)
        out["memory/reference_params_bytes"] = 0 if rs.ref_params is None else tree_bytes(rs.ref_params)
    if run.critic_values is not None:
        out |= compiled_stats(run.critic_values, state.params, tokens, attn, name="value_pass")
    if run.policy_logprobs is not None:
        out |= compiled_stats(run.policy_logprobs, state.params, tokens, attn, name="policy_pass")
    return out
