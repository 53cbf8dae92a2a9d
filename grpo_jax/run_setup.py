"""Building a run's pieces from its config: tokenizer, policy (pretrained or random), warm start, reference."""
from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import storage
from grpo_jax.config import ConfigError, to_yaml
from grpo_jax.evaluation import encode_prompts
from grpo_jax.experiment import ExperimentConfig, ModelSection
from grpo_jax.layout import Layout, auto_layout, planned_logprobs
from grpo_jax.mesh import batch_size_multiple, shard_model
from grpo_jax.models import CausalLM, build_model, load_hf, save_hf, token_logprobs
from grpo_jax.models.packed import plan_logprobs
from grpo_jax.models.transformer import narrowed
from grpo_jax.multihost import is_primary, sync, to_host

log = logging.getLogger(__name__)


def load_tokenizer(model_cfg: ModelSection):
    if model_cfg.tokenizer == "char":
        from grpo_jax.data.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_cfg.path
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(source) if storage.is_remote(source) else source)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer {model_cfg.tokenizer or model_cfg.path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, cfg: ExperimentConfig, mesh) -> CausalLM:
    """An HF folder (local or gs://) with the run's model settings (dtypes, remat, scanned layers)."""
    m = cfg.model
    return load_hf(path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat, scan_layers=m.scan_layers)


def build_policy(cfg: ExperimentConfig, tokenizer, mesh) -> CausalLM:
    """The initial policy: ``model.path`` loaded, or ``model.init`` randomly initialised from ``cfg.seed``."""
    m = cfg.model
    if m.path is not None:
        return load_model(m.path, cfg, mesh)
    model_cfg = dataclasses.replace(m.init, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                    scan_layers=m.scan_layers)
    if model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.init.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    return shard_model(build_model(model_cfg, rngs=nnx.Rngs(cfg.seed)), mesh)


def warm_start(cfg: ExperimentConfig, policy: CausalLM, tokenizer, train_examples, run_dir, mesh) -> CausalLM:
    """Supervised warm start (once per run dir): trains, saves ``run_dir/warm_start`` as an HF folder, and returns the
    policy *reloaded from that folder*, so a fresh run and a resumed one start from bit-identical weights."""
    if cfg.warm_start is None:
        return policy
    folder = storage.location(run_dir) / "warm_start"
    if not (folder / "config.json").exists():
        from grpo_jax.sft import run_sft

        policy, history = run_sft(policy, tokenizer, train_examples, cfg.warm_start.sft,
                                  completion_fn=cfg.warm_start.completion_fn(train_examples))
        export_hf(policy, folder)
        if is_primary():
            (folder / "sft_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        log.info("warm start: %d SFT steps, final loss %.4f", len(history),
                 history[-1]["loss"] if history else float("nan"))
    return load_model(folder, cfg, mesh)


def export_hf(model: CausalLM, folder, tokenizer=None) -> None:
    """``save_hf`` (and the tokenizer) into ``folder`` (local or ``gs://``), called by every process: params that
    span processes are gathered, process 0 writes, and all return once the files are complete."""
    if jax.process_count() > 1:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, jax.tree.map(to_host, params), rest)
    if is_primary():
        with storage.staged(folder) as local:
            save_hf(model, local)
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
    sync("export_hf")


def frozen_copy(params: nnx.State, compute_dtype: str) -> nnx.State:
    """A copy of ``params`` for the frozen reference, each float array in ``compute_dtype`` where that is narrower.
    Every use of a param casts it to the compute dtype first (``transformer._dense``, ``rms_norm``, ``embed_tokens``,
    ``lm_head_ExV``), so the reference's log-probs are bit-identical and, with bfloat16 compute on float32 params,
    it takes half the bytes. A copy in any case: the train step donates the policy's buffers."""

    def one(w):
        out = narrowed(w, compute_dtype)
        return jnp.copy(w) if out is w else out

    return jax.tree.map(one, params)


def load_reference(cfg: ExperimentConfig, policy: tuple[nnx.GraphDef, nnx.State],
                   mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Frozen reference (graphdef, params in the compute dtype: ``frozen_copy``): ``model.ref_path``, or a copy of the
    initial policy."""
    if cfg.model.ref_path is None:
        graphdef, params = policy
        return graphdef, frozen_copy(params, cfg.model.dtype)
    graphdef, params = nnx.split(load_model(cfg.model.ref_path, cfg, mesh))
    return graphdef, frozen_copy(params, cfg.model.dtype)


def logprob_fn(graphdef: nnx.GraphDef, temperature: float, chunk_size: int, micro_batches: int = 1,
               layout: Layout | None = None, mesh=None):
    """Jitted ``(params, tokens_BxS, mask_BxS) -> logps_BxS`` for a frozen model (the reference), computed one
    micro-batch at a time (rows k, k+m, k+2m, ... as in the train step), so its activations are those of a
    micro-batch, not of the whole batch. With a ``layout`` (packed / shared_prompt) each call plans its rows on the
    host (``grpo_jax.layout.planned_logprobs``; the layout's micro-batches are strided here)."""

    def one(params, tokens_BxS, mask_BxS, plan):
        model = nnx.merge(graphdef, params)
        if plan is not None:
            return plan_logprobs(model, plan, temperature=temperature, return_entropy=False, chunk_size=chunk_size)[0]
        return token_logprobs(model, tokens_BxS, mask_BxS, temperature=temperature, chunk_size=chunk_size)

    @jax.jit
    def fn(params, tokens_BxS, mask_BxS, plan=None):
        B, S = tokens_BxS.shape
        if micro_batches == 1:
            return one(params, tokens_BxS, mask_BxS, plan)
        split = lambda x: x.reshape((x.shape[0] // micro_batches, micro_batches) + x.shape[1:]).swapaxes(0, 1)  # noqa: E731
        logps = jax.lax.map(lambda xs: one(params, *xs), jax.tree.map(split, (tokens_BxS, mask_BxS, plan)))
        return logps.swapaxes(0, 1).reshape(B, S)

    if layout is None:
        return fn
    return planned_logprobs(fn, dataclasses.replace(layout, contiguous=False), mesh)


def prompt_bucket(cfg: ExperimentConfig, tokenizer, train_rows: list[dict]) -> int:
    """The smallest prompt length ``generate`` pads to: ``rollout.min_prompt_bucket``, or with
    ``rollout.fixed_prompt_len`` at least the longest training prompt (so every step has the same shape)."""
    if not cfg.rollout.fixed_prompt_len or not train_rows:
        return cfg.rollout.min_prompt_bucket
    return max(cfg.rollout.min_prompt_bucket, *map(len, encode_prompts(tokenizer, train_rows)))


def resolve_layout(cfg: ExperimentConfig, algorithm, tokenizer, train_rows: list[dict]) -> ExperimentConfig:
    """``cfg`` with ``train.layout: auto`` made concrete (``grpo_jax.layout.auto_layout`` on the median token count
    of the first 256 training prompts): padded for an algorithm whose forward reads the padded rows, for groups of
    one and for ragged groups (``rollout.dynamic_group``, whose plans change shape with the data)."""
    if cfg.train.layout != "auto":
        return cfg
    kind, G = "padded", cfg.rollout.group_size
    if algorithm.packs and G > 1 and cfg.rollout.dynamic_group is None and train_rows:
        median = float(np.median([len(p) for p in encode_prompts(tokenizer, train_rows[:256])]))
        kind = auto_layout(G, median, cfg.rollout.max_new_tokens)
    log.info("train.layout auto: %s", kind)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, layout=kind))


def validate(cfg: ExperimentConfig, mesh) -> None:
    """Checks that need the devices; raise before any compute."""
    B, shards, m = cfg.train.batch_prompts * cfg.rollout.group_size, batch_size_multiple(mesh), cfg.train.micro_batches
    if B % m or (B // m) % shards:
        raise ConfigError(
            f"train.batch_prompts * rollout.group_size = {B} sequences must split into train.micro_batches={m} "
            f"micro-batches that are each divisible by the mesh's data*fsdp = {shards}"
        )


def write_config(run_dir: storage.Location, cfg: ExperimentConfig) -> None:
    """Every process checks an existing config.yaml before process 0 (re)writes it."""
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        raise ConfigError(
            f"{path} holds a different config; resume with the same one or use a new --run-dir")
    sync("config checked")
    if is_primary():
        path.write_text(text)


def build_meshes(cfg: ExperimentConfig):
    """(the trainer's mesh, ``rollout.mesh`` built or None), checked against the batch: config errors before any
    compute."""
    try:
        mesh = cfg.mesh.build()
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    try:
        sampler_mesh = None if cfg.rollout.mesh is None else cfg.rollout.mesh.build()
    except ValueError as e:
        raise ConfigError(f"rollout.mesh: {e}") from None
    validate(cfg, mesh)
    return mesh, sampler_mesh
