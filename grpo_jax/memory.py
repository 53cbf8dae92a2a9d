"""Per-device memory of a GRPO run, estimated from the config alone (no devices, no weights).

    python -m grpo_jax.memory experiments/qwen25_15b_gsm8k --prompt-len 512   # v4-8, v5e-8 and 1xH100 columns

What the arrays of ``loop.train`` hold in each phase, counted from the code and from XLA's buffer assignment of the
jitted functions the loop runs: ``rollout.sample``, ``run_setup.logprob_fn`` and ``train_step.make_train_step``.
``tests/test_memory.py`` compares each phase with XLA:CPU's compiled ``memory_analysis()`` (arguments + outputs +
temporaries - aliased, per device) on three float32 configs (1 device, data=2, data=8; remat on and off; 1 and 2
micro-batches; beta 0 and 0.04): within 6% (the rollout, since the shared-prompt decode cache, -2 to -8%), and a
wider sweep of shapes (E, F, N, K, S, V, C) within 7%, except no remat with exactly 2 micro-batches (up to +16%:
XLA overlaps the two micro-batches' saved values only in part).
Left out: XLA:CPU computes bf16 in float32 and keeps float32 copies (bf16 on CPU measured up to 25% above these
formulas, 38% in the sampler), so bf16 is checked only through the dtype terms; TPU pads a last dimension below 128
(head_dim 64: the KV cache) to 128 lanes; the runtime's reserve.

Sharding as mesh.py sets it: params and AdamW moments placed by LOGICAL_AXIS_RULES (``init_train_state``),
activations split over the batch axes (``mesh.constrain_batch`` on each layer's output: left to itself, with
fsdp > 1 XLA split them along E and gathered the whole batch's float32 logits on every device); for token log-probs
the output head's vocab split over fsdp (``mesh.split_vocab``; f = fsdp where fsdp x t divides V, else 1), each
chunk's hidden states gathered over fsdp instead; for decode's logits the head gathered once in cb
(``mesh.gather_fsdp``). fsdp = 4, 8 and tensor = 2, 4, 8 meshes came within 16%. ``xla_cpu=True`` adds what XLA:CPU
holds beyond these formulas with bf16 compute (measured on fsdp = 8): it runs a bf16 matmul in float32, so the
head has a float32 copy beside the bf16 one (``_logprob_head``).

Notation: L layers, E hidden, F MLP, N heads, K kv heads, H head_dim, V vocab; pb / cb bytes of param_dtype / compute
dtype; d = mesh data*fsdp (batch shards), t = tensor (N, K, F, V are divided by t where divisible: Nt, Kt, Ft, Vt);
S = prompt + max_new_tokens; B = batch_prompts*G sequences; b = B/(micro_batches*d) rows of one micro-batch;
C = train.logprob_chunk; p = prompt rows per device (the bucketed prompt count / d).

Resident all run: params (each param's shards as ``mesh.param_sharding`` places them) x pb; AdamW's two moments
(optax keeps them in the params' dtype): 2 x params, or with ``model.master_weights`` the float32 master copy and
float32 moments: 3 x 4 bytes per param; the frozen reference when beta > 0: a copy of the policy in rb = min(pb, cb)
bytes (``run_setup.frozen_copy``). With LoRA (``model.lora``) the float32 adapters join the params and only they
have moments and gradients (the frozen base has none: no gradient of a gathered layer or of the head either); the
reference is the base itself (0 bytes); the
training rollout (``rollout.merge_lora``) samples from a merged copy of the base weights: params again.
Then one phase at a time; the peak is resident + the largest phase:
  rollout    decode's weights (each layer's slice in cb, made once before the loop: the layer params again; with
             fsdp > 1 XLA hoists the loop-invariant all-gathers, so every param gathered over fsdp (the layers in cb)
             plus the [E, Vt] head in cb) and
             the larger of: the prefill (the prompt rows' cache twice, per-layer buffers and the scan's stacked copy,
             p*forward(prompt, prompt², 8 + cb), last-position logits p*Vt*cb, the scan's slice of one layer),
             decoding (the KV cache and 4 float32 [p*G, V] sampling buffers). KV cache
             (``models.cache.GroupKVCache``): the prompt part once per prompt, 2*L*Kt*H*prompt*cb per prompt row, and
             max_new_tokens - 1 completion slots per sample
             row, 2*L*Kt*H*(max_new_tokens - 1)*cb. The largest of the training rollout and the eval rollouts (greedy,
             and pass@k samples).
  reference  one micro-batch at a time (b rows: run_setup.logprob_fn): the head [E, Vt/f] in cb, one layer's weights
             gathered over fsdp (layer params / t x rb, fsdp > 1), and the larger of a layer's forward
             b*forward(S, Σ blocks) and the head's: hidden states and their chunked copy 2*b*S*E*cb, one chunk of
             float32 logits b*C*Vt*4 and (f > 1) its hidden states gathered b*f*C*E*cb.
  train      gradients (pb; twice with micro_batches > 1: the accumulator and this micro-batch's), each layer's saved
             values (remat: its input L*b*S*E*cb; without: L*b*values(S, Σ blocks)), twice with exactly 2 micro-batches
             (the scan over the second has one step, XLA inlines it and the two overlap), and the larger of
             a layer's backward: its values (recomputed under remat), the MLP-stage cotangents b*S*cb*(2*Ft + E),
               and with fsdp > 1 its weights gathered and their gradient (2 x layer params / t x pb);
             the head's backward, one chunk: two float32 [b, C, Vt] (logits and their gradient; the head is one 2-D
               matmul [b*C, E] @ [E, Vt], whose weight gradient needs no transposed copy -- never [B, S, V], see
               models/logprobs.py), the hidden states and their chunked copy 2*b*S*E*cb (and gathered, f > 1), the
               head [E, Vt/f] in cb and its gradient in pb (``_logprob_head``).
  values(T, pairs) per row = Nt*pairs*(9 + cb) + T*(cb*(6*Ft + 2*Nt*H + 2*Kt*H + 5*E) + [cb < 4]*8*E): what JAX
             saves of a layer for its backward (``jax.ad_checkpoint.print_saved_residuals``): the masked float32 scores
             and their exp, the probabilities in cb and the bool mask of every query block (``pairs`` = the sum of
             queries x keys over ``score_blocks``: the causal attention's query blocks of ``model.attention_block``
             positions each see only the keys up to their end; no flash attention); six F-vectors;
             q, the attention output, k, v; the two norms' outputs (2 E-vectors each) and the mid-layer residual; the
             norms' float32 inputs when cb is narrower.
  forward(T, pairs, score_bytes) per row = T*2*E*cb + max(Nt*pairs*score_bytes, T*3*Ft*cb): a layer run without
             saving anything: the residual stream in and out, and the larger of the MLP (gate, up, their product) and
             attention: one block (the prefill; a training forward of S <= attention_block) holds float32 scores,
             their softmax and cb probabilities (score_bytes 8 + cb); several query blocks run side by side on
             XLA:CPU, all blocks' float32 scores and cb probabilities live at once (4 + cb, measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from grpo_jax.experiment import ExperimentConfig, load_experiment
from grpo_jax.mesh import LOGICAL_AXIS_RULES, vocab_split_axes
from grpo_jax.models import ModelConfig
from grpo_jax.models.published import PUBLISHED_CONFIGS
from grpo_jax.models.shapes import adapter_shapes, param_count, param_shapes
from grpo_jax.rollout import bucket

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
# name -> (JAX devices, HBM GiB per device). v4-8: 4 chips (megacore: one JAX device each) x 32 GiB; v5e-8: 8 x 16 GiB;
# H100 SXM: 81,559 MiB as nvidia-smi reports it (JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION).
TARGETS: dict[str, tuple[int, float]] = {"v4-8": (4, 32.0), "v5e-8": (8, 16.0), "1xH100": (1, 81559 / 1024)}

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


def shard_numel(axes: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int]) -> int:
    """Elements of one device's shard: a dimension is split over its mesh axes only when divisible (as in mesh.py)."""
    rules = dict(LOGICAL_AXIS_RULES)
    n = 1
    for name, dim in zip(axes, shape):
        rule = rules[name]
        split = math.prod(sizes[a] for a in (() if rule is None else (rule,) if isinstance(rule, str) else rule))
        n *= dim // split if dim % split == 0 else dim
    return n


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


def score_blocks(S: int, block: int | None) -> list[int]:
    """(queries x keys) of each query block of ``transformer.causal_attention`` over S positions: block j holds
    queries [jb, (j+1)b) over keys [0, (j+1)b) (one block of S x S when ``block`` is None)."""
    b = S if block is None else block
    return [min(b, S - s) * min(s + b, S) for s in range(0, S, b)]


def _logprob_head(sizes: dict[str, int], E: int, V: int, Vt: int, pb: int, cb: int, rows: int, lora: bool,
                  xla_cpu: bool) -> tuple[int, int]:
    """Bytes of the log-prob head's weights (train step, reference pass): the head in cb and, trained, its gradient
    in pb, and XLA:CPU's float32 copies (``xla_cpu``); with the vocab split over f > 1 fsdp devices
    (``mesh.split_vocab``) each is 1/f, plus a chunk's ``rows`` hidden states gathered over fsdp and the reshards
    from the param's split: the param's shard and its cast, and trained, the gradient's transposed copy and its
    reshard back (measured on XLA:CPU, E 256, V 32k, fsdp 8)."""
    f = sizes["fsdp"] if vocab_split_axes(sizes, V) else 1
    cpu32, split, gathered = (4 - cb) * (xla_cpu and cb < 4), E * Vt // f * (f > 1), f * rows * E * cb * (f > 1)
    train = E * Vt * (cb + pb * (not lora) + (4 - cb * (not lora)) * (xla_cpu and cb < 4)) // f
    return (train + split * (pb + cb + 2 * pb * (not lora) + cpu32) + gathered,
            E * Vt * cb // f + split * ((pb if lora else min(pb, cb)) + cpu32) + gathered)


def estimate(cfg: ModelConfig, sizes: dict[str, int], *, batch_prompts: int, group_size: int, prompt_len: int,
             max_new_tokens: int, micro_batches: int, beta: float, logprob_chunk: int,
             eval_rollouts: tuple[tuple[int, int], ...] = (), master_weights: bool = False,
             merged_sampler: bool = True, xla_cpu: bool = False) -> MemoryEstimate:
    """Per-device bytes for one model on mesh ``sizes``; ``prompt_len`` = the padded prompt length (a bucket);
    ``eval_rollouts`` = (prompts, samples) of each eval generate call; ``xla_cpu``: XLA:CPU's float32 copies too."""
    pb, cb, d, t = BYTES[cfg.param_dtype], BYTES[cfg.dtype], sizes["data"] * sizes["fsdp"], sizes["tensor"]
    L, E, H, V = cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    tensor_only = {"data": 1, "fsdp": 1, "tensor": t}  # a param gathered over fsdp
    Nt, Kt, Ft, Vt = (x // t if x % t == 0 else x for x in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, V))
    S, B = prompt_len + max_new_tokens, batch_prompts * group_size
    if B % micro_batches or (B // micro_batches) % d:
        raise ValueError(f"batch_prompts * group_size = {B} sequences do not split into micro_batches={micro_batches} "
                         f"micro-batches each divisible by the mesh's data*fsdp = {d}")
    b, C = B // micro_batches // d, min(logprob_chunk, S - 1)

    def values(T: int, pairs: int) -> int:
        return Nt * pairs * (9 + cb) + T * (cb * (6 * Ft + 2 * Nt * H + 2 * Kt * H + 5 * E) + (8 * E if cb < 4 else 0))

    def forward(T: int, pairs: int, score_bytes: int) -> int:
        return T * 2 * E * cb + max(Nt * pairs * score_bytes, T * 3 * Ft * cb)

    blocks = score_blocks(S, cfg.attention_block)  # the training forward's causal attention, block by block
    score_bytes = (8 if len(blocks) == 1 else 4) + cb
    shapes = param_shapes(cfg)
    params = sum(shard_numel(a, s, sizes) for a, s in shapes) * pb
    stacked = sum(shard_numel(a, s, sizes) for a, s in shapes if a[0] == "layers") * pb
    layer_t = sum(shard_numel(a, s, tensor_only) for a, s in shapes if a[0] == "layers") // L
    gathered = layer_t * pb if sizes["fsdp"] > 1 else 0  # one layer's weights all-gathered over fsdp
    decode_w = (sum(shard_numel(a, s, tensor_only) * (cb if a[0] == "layers" else pb) for a, s in shapes)
                + E * Vt * cb if sizes["fsdp"] > 1 else stacked // pb * cb)  # decode's weights (docstring)

    def rollout(prompts: int, samples: int, copy: int = 0) -> tuple[int, int]:
        p = -(-bucket(prompts, 1) // d)  # prompt rows per device, padded as rollout.generate pads them
        slot = 2 * L * Kt * H * cb  # one cached token of one row, all layers
        kv = slot * p * (prompt_len + samples * (max_new_tokens - 1))
        prefill = 2 * slot * prompt_len * p + p * (forward(prompt_len, prompt_len**2, 8 + cb) + Vt * cb) + layer_t * pb
        return kv, copy + decode_w + max(prefill - kv, 4 * p * samples * V * 4)

    # LoRA's training rollout samples from a copy of the base weights with the adapters merged in
    merged = params if cfg.lora is not None and merged_sampler else 0
    kv_cache, rollout_work = max((rollout(*r) for r in ((batch_prompts, group_size, merged),) + eval_rollouts),
                                 key=sum)
    overlap = 2 if micro_batches == 2 else 1  # the single-step scan over the second micro-batch is inlined
    saved = overlap * L * b * (S * E * cb if cfg.remat else values(S, sum(blocks)))
    lora = cfg.lora is not None  # the base is frozen: no gradient of a gathered layer or of the head
    layer = b * S * cb * (2 * Ft + E) + (b * values(S, sum(blocks)) if cfg.remat else 0) + (2 - lora) * gathered
    head_w, ref_head_w = _logprob_head(sizes, E, V, Vt, pb, cb, b * C, lora, xla_cpu)
    head = b * (2 * C * Vt * 4 + 2 * S * E * cb) + head_w
    adapters = sum(shard_numel(a, s, sizes) for a, s in adapter_shapes(cfg)) * 4  # float32
    trained = adapters if lora else params
    return MemoryEstimate(
        params=params + adapters, optimizer=3 * trained * 4 // pb if master_weights else 2 * trained,
        reference=params * min(pb, cb) // pb if beta > 0 and not lora else 0,
        kv_cache=kv_cache, rollout_work=rollout_work,
        reference_logprobs=(ref_head_w + gathered * min(pb, cb) // pb + max(
            b * forward(S, sum(blocks), score_bytes), b * (2 * S * E * cb + C * Vt * 4))) * (beta > 0),
        gradients=trained * (2 if micro_batches > 1 else 1),
        activations=saved + max(layer, head),
    )


def estimate_experiment(cfg: ExperimentConfig, model_cfg: ModelConfig, num_devices: int, *,
                        prompt_len: int, xla_cpu: bool = False) -> MemoryEstimate:
    """``estimate`` with the experiment's dtypes, remat, batch, mesh and eval; ``prompt_len`` = the longest prompt
    of a batch in tokens (padded to its bucket as the rollout pads it)."""
    m = cfg.model
    model_cfg = dataclasses.replace(model_cfg, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, lora=m.lora)
    sizes = mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices or num_devices)
    evals = ((cfg.eval.batch_prompts, 1),) + (((cfg.eval.batch_prompts, cfg.eval.pass_k),) if cfg.eval.pass_k else ())
    return estimate(model_cfg, sizes, batch_prompts=cfg.train.batch_prompts, group_size=cfg.rollout.group_size,
                    prompt_len=bucket(prompt_len, cfg.rollout.min_prompt_bucket),
                    max_new_tokens=cfg.rollout.max_new_tokens, micro_batches=cfg.train.micro_batches,
                    beta=cfg.algo.loss.beta, logprob_chunk=cfg.train.logprob_chunk, eval_rollouts=evals,
                    master_weights=bool(m.master_weights), merged_sampler=cfg.rollout.merge_lora, xla_cpu=xla_cpu)


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


LABELS = {"params": "params", "optimizer": "AdamW moments (+ master copy)", "reference": "reference params",
          "kv_cache": "rollout: KV cache", "rollout_work": "rollout: decode weights, prefill or sampling",
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
