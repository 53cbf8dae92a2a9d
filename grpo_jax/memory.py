"""Per-device memory of a GRPO run, estimated from the config alone (no devices, no weights).

    python -m grpo_jax.memory experiments/qwen25_15b_gsm8k --prompt-len 512   # v4-8, v5e-8 and 1xH100 columns

An estimate of what the arrays of ``loop.train`` hold, not a measurement: XLA adds fusion temporaries, TPU pads a
last dimension below 128 (head_dim 64: the KV cache) to 128 lanes, and the runtime keeps a reserve. Against
XLA:CPU's compiled ``memory_analysis()`` of a 4-layer bf16 model (E=256, N=8, V=16384, S=512, 32 sequences) the
formulas gave: train step with remat +28%, reference log-probs -13%, sampler -15%; without remat -13% with one
micro-batch but -51% with two (XLA kept more than one micro-batch's values), so without remat read it as a floor.

Notation: L layers, E hidden, F MLP, N heads, K kv heads, H head_dim, V vocab; pb / cb bytes of param_dtype / compute
dtype; d = mesh data*fsdp (batch shards), t = tensor (N, K, F, V are divided by t where divisible: Nt, Kt, Ft, Vt);
S = prompt + max_new_tokens; B = batch_prompts*G sequences; b = B/(micro_batches*d) rows of one micro-batch.

Resident all step: params (each param's shards as ``mesh.param_sharding`` places them) x pb; AdamW's two moments
(optax keeps them in the params' dtype): 2 x params; the frozen reference (a copy of the policy) when beta > 0.
Then one phase at a time; the peak is resident + the largest phase:
  rollout    KV cache 2*L*Kt*H*S*cb per row, for the G rows per prompt plus the prefilled prompt rows they are
             repeated from; the per-layer weight slices decode reads (the layer params again, pb); the prefill's
             logits [P, prompt, Vt] in cb and one layer's forward(prompt, S); 4 float32 [rows, V] sampling buffers.
             The largest of the training rollout and the eval rollouts (greedy, and pass@k samples).
  reference  log-probs of the whole batch (B/d rows, not micro-batched: loop.build_batch): per row one layer's
             forward(S, S) and one chunk of float32 logits C*Vt*4 (C = train.logprob_chunk), plus one layer's
             gathered weights layer params / t x pb and the head E*Vt*cb.
  train      gradients (pb; twice with micro_batches > 1: the accumulator and this micro-batch's) and one
             micro-batch's activations: with remat only each layer's input L*b*S*E*cb is kept, without it every
             layer's values L*b*values(S); plus one layer's working set in the backward (its values and their
             cotangents, 2*b*values(S)), the head (final hidden, its chunked copy and gradient 3*b*S*E*cb; a chunk
             of float32 logits and their gradient 2*b*C*Vt*4 -- never [B, S, V], see models/logprobs.py) and one
             layer's weights gathered over fsdp with their gradient (2 x layer params / t x pb, head 2*E*Vt*cb).
  values(T, keys) per row = T*(8E + cb*(4E + 2*Nt*H + 2*Kt*H + 6*Ft) + Nt*keys*(4 + cb)): what JAX saves of a
             layer for its backward (``jax.ad_checkpoint.print_saved_residuals``): the two norms' float32 inputs, four
             E-vectors, q and the attention output, k and v, six F-vectors, and the float32 softmax output with the
             compute-dtype probabilities [Nt, T, keys] (no flash attention).
  forward(T, keys) per row = T*(2E*cb + max(cb*(2*Nt*H + 2*Kt*H) + Nt*keys*(4 + cb), 3*Ft*cb)): a layer run
             without saving anything: the residual stream in and out, and the larger of attention (q, k, v, scores,
             probabilities) and the MLP (gate, up, their product).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from grpo_jax.experiment import ExperimentConfig, load_experiment
from grpo_jax.mesh import LOGICAL_AXIS_RULES
from grpo_jax.models import ModelConfig
from grpo_jax.rollout import bucket

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
# name -> (JAX devices, HBM GiB per device). v4-8: 4 chips (megacore: one JAX device each) x 32 GiB; v5e-8: 8 x 16 GiB;
# H100 SXM: 81,559 MiB as nvidia-smi reports it (JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION).
TARGETS: dict[str, tuple[int, float]] = {"v4-8": (4, 32.0), "v5e-8": (8, 16.0), "1xH100": (1, 81559 / 1024)}

_QWEN_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                    vocab_size=151936, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)
# config.json as published at https://huggingface.co/<id>/blob/main/config.json (the fields ModelConfig reads).
PUBLISHED_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(_QWEN_COMMON, model_type="qwen2", hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(_QWEN_COMMON, model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       max_position_embeddings=32768),
    "Qwen/Qwen3-0.6B": dict(_QWEN_COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            attention_bias=False, max_position_embeddings=40960),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per device; see the module docstring for each formula."""

    params: int
    optimizer: int
    reference: int
    kv_cache: int
    rollout_work: int
    reference_logprobs: int
    gradients: int
    activations: int

    @property
    def phases(self) -> dict[str, int]:
        return {"rollout": self.kv_cache + self.rollout_work, "reference": self.reference_logprobs,
                "train": self.gradients + self.activations}

    @property
    def resident(self) -> int:
        return self.params + self.optimizer + self.reference

    @property
    def total(self) -> int:
        return self.resident + max(self.phases.values())


def param_shapes(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(logical axes, shape) of every param of ``CausalLM`` (models/transformer.py, heads.py), layers stacked."""
    L, E, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size)
    q, kv, o = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"), ("heads", "head_dim", "embed")
    layer = [(("norm",), (E,)), (q, (E, N, H)), (kv, (E, K, H)), (kv, (E, K, H)), (o, (N, H, E)), (("norm",), (E,)),
             (("embed", "mlp"), (E, F)), (("embed", "mlp"), (E, F)), (("mlp", "embed"), (F, E))]
    bias_kv = (("kv_heads", "head_dim"), (K, H))
    layer += [(("heads", "head_dim"), (N, H)), bias_kv, bias_kv] * cfg.qkv_bias
    layer += [(("embed",), (E,))] * (cfg.o_bias + cfg.mlp_bias) + [(("mlp",), (F,))] * 2 * cfg.mlp_bias
    layer += [(("norm",), (H,))] * 2 * cfg.qk_norm
    head = [] if cfg.tie_word_embeddings else [(("embed", "vocab"), (E, V))]
    return [(("vocab", "embed"), (V, E)), (("norm",), (E,))] + head + [(("layers",) + a, (L,) + s) for a, s in layer]


def shard_numel(axes: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int]) -> int:
    """Elements of one device's shard: a dimension is split over its mesh axes only when divisible (as in mesh.py)."""
    rules = dict(LOGICAL_AXIS_RULES)
    n = 1
    for name, dim in zip(axes, shape):
        rule = rules[name]
        split = math.prod(sizes[a] for a in (() if rule is None else (rule,) if isinstance(rule, str) else rule))
        n *= dim // split if dim % split == 0 else dim
    return n


def param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in param_shapes(cfg))


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 resolved, as ``make_mesh`` does over ``num_devices`` devices."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()) or num_devices % known:
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not fit {num_devices} devices")
    sizes |= {a: num_devices // known for a in free}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} uses {math.prod(sizes.values())} devices, not {num_devices}")
    return sizes


def estimate(cfg: ModelConfig, sizes: dict[str, int], *, batch_prompts: int, group_size: int, prompt_len: int,
             max_new_tokens: int, micro_batches: int, beta: float, logprob_chunk: int,
             eval_rollouts: tuple[tuple[int, int], ...] = ()) -> MemoryEstimate:
    """Per-device bytes for one model on mesh ``sizes``; ``prompt_len`` = the padded prompt length (a bucket);
    ``eval_rollouts`` = (prompts, samples) of each eval generate call."""
    pb, cb, d, t = BYTES[cfg.param_dtype], BYTES[cfg.dtype], sizes["data"] * sizes["fsdp"], sizes["tensor"]
    L, E, H, V = cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    Nt, Kt, Ft, Vt = (x // t if x % t == 0 else x for x in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, V))
    S, B = prompt_len + max_new_tokens, batch_prompts * group_size
    if B % micro_batches or (B // micro_batches) % d:
        raise ValueError(f"batch_prompts * group_size = {B} sequences do not split into micro_batches={micro_batches} "
                         f"micro-batches each divisible by the mesh's data*fsdp = {d}")
    b, C = B // micro_batches // d, min(logprob_chunk, S - 1)

    def values(T: int, keys: int) -> int:
        return T * (8 * E + cb * (4 * E + 2 * Nt * H + 2 * Kt * H + 6 * Ft) + Nt * keys * (4 + cb))

    def forward(T: int, keys: int) -> int:
        return T * (2 * E * cb + max(cb * (2 * Nt * H + 2 * Kt * H) + Nt * keys * (4 + cb), 3 * Ft * cb))

    shapes = param_shapes(cfg)
    params = sum(shard_numel(a, s, sizes) for a, s in shapes) * pb
    stacked = sum(shard_numel(a, s, sizes) for a, s in shapes if a[0] == "layers") * pb
    layer_t = sum(shard_numel(a, s, {"data": 1, "fsdp": 1, "tensor": t}) for a, s in shapes if a[0] == "layers") // L

    def rollout(prompts: int, samples: int) -> tuple[int, int]:
        p = -(-bucket(prompts, 1) // d)  # prompt rows per device, padded as rollout.generate pads them
        kv = 2 * L * Kt * H * S * cb * (p * samples + p)
        return kv, stacked + p * prompt_len * Vt * cb + p * forward(prompt_len, S) + 4 * p * samples * V * 4

    kv_cache, rollout_work = max((rollout(*r) for r in ((batch_prompts, group_size),) + eval_rollouts), key=sum)
    saved = L * b * S * E * cb if cfg.remat else L * b * values(S, S)
    head = b * (3 * S * E * cb + 2 * C * Vt * 4) + 2 * E * Vt * cb
    return MemoryEstimate(
        params=params, optimizer=2 * params, reference=params if beta > 0 else 0,
        kv_cache=kv_cache, rollout_work=rollout_work,
        reference_logprobs=(B // d * (forward(S, S) + C * Vt * 4) + layer_t * pb + E * Vt * cb
                            if beta > 0 else 0),
        gradients=params * (2 if micro_batches > 1 else 1),
        activations=saved + 2 * b * values(S, S) + head + 2 * layer_t * pb,
    )


def estimate_experiment(cfg: ExperimentConfig, model_cfg: ModelConfig, num_devices: int, *,
                        prompt_len: int) -> MemoryEstimate:
    """``estimate`` with the experiment's dtypes, remat, batch, mesh and eval; ``prompt_len`` = the longest prompt
    of a batch in tokens (padded to its bucket as the rollout pads it)."""
    m = cfg.model
    model_cfg = dataclasses.replace(model_cfg, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    sizes = mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices or num_devices)
    evals = ((cfg.eval.batch_prompts, 1),) + (((cfg.eval.batch_prompts, cfg.eval.pass_k),) if cfg.eval.pass_k else ())
    return estimate(model_cfg, sizes, batch_prompts=cfg.train.batch_prompts, group_size=cfg.rollout.group_size,
                    prompt_len=bucket(prompt_len, cfg.rollout.min_prompt_bucket),
                    max_new_tokens=cfg.rollout.max_new_tokens, micro_batches=cfg.train.micro_batches,
                    beta=cfg.algo.loss.beta, logprob_chunk=cfg.train.logprob_chunk, eval_rollouts=evals)


def model_config(cfg: ExperimentConfig) -> ModelConfig:
    """``model.init``, the config.json of a local ``model.path``, or a published config from PUBLISHED_CONFIGS."""
    path = cfg.model.path
    if cfg.model.init is not None:
        return cfg.model.init
    if (Path(path) / "config.json").is_file():
        return ModelConfig.from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    if path in PUBLISHED_CONFIGS:
        return ModelConfig.from_hf_config(PUBLISHED_CONFIGS[path])
    raise ValueError(f"model.path={path!r}: no config.json there and not one of {sorted(PUBLISHED_CONFIGS)}")


LABELS = {"params": "params", "optimizer": "AdamW moments", "reference": "reference params",
          "kv_cache": "rollout: KV cache", "rollout_work": "rollout: weight slices, logits, prefill",
          "reference_logprobs": "reference log-probs", "gradients": "train: gradients",
          "activations": "train: activations (1 micro-batch)"}


def table(folder: str, targets: dict[str, tuple[int, float | None]], prompt_len: int, overrides: list[str]) -> str:
    """A markdown table of GiB per device, one column per target (name -> (devices, HBM GiB or None))."""
    cfg = load_experiment(folder, overrides)
    model = model_config(cfg)
    lines = [f"{folder}: {model.model_type} {param_count(model) / 1e9:.3f}B params ({cfg.model.param_dtype}), "
             f"prompt <= {prompt_len} + {cfg.rollout.max_new_tokens} new tokens, {cfg.train.batch_prompts}x"
             f"{cfg.rollout.group_size} sequences, {cfg.train.micro_batches} micro-batches, beta "
             f"{cfg.algo.loss.beta}; GiB per device, estimated by grpo_jax/memory.py", "",
             "| | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    cols = {name: {"mesh data x fsdp x tensor": "x".join(map(str, mesh_sizes(
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices or n).values()))}
        for name, (n, _) in targets.items()}
    for name, (n, hbm) in targets.items():
        est = estimate_experiment(cfg, model, n, prompt_len=prompt_len)
        cols[name] |= {label: f"{getattr(est, field) / GIB:.2f}" for field, label in LABELS.items()}
        fits = f" of {hbm:.3g} ({est.total / GIB / hbm:.0%})" if hbm else ""
        phase = max(est.phases, key=est.phases.get)
        cols[name]["**peak** (resident + largest phase)"] = f"**{est.total / GIB:.2f}**{fits}, {phase}"
    for row in cols[next(iter(targets))]:
        lines.append(f"| {row} | " + " | ".join(cols[name][row] for name in targets) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpo_jax.memory", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="experiments/<name> or a config.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.tensor=2 train.micro_batches=16")
    parser.add_argument("--prompt-len", type=int, required=True, help="longest prompt of a batch, in tokens")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all of them")
    parser.add_argument("--devices", type=int, help="one column for this many devices instead of the targets")
    args = parser.parse_intermixed_args(argv)
    targets = {f"{args.devices} devices": (args.devices, None)} if args.devices else {
        name: TARGETS[name] for name in (args.target or TARGETS)}
    print(table(args.experiment, targets, args.prompt_len, args.overrides))


if __name__ == "__main__":
    main()
