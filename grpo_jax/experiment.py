"""The whole run's config tree, as written in ``experiments/<name>/config.yaml``.

    cfg = load_experiment("experiments/arith_tiny", overrides=["algo.loss.beta=0.0", "train.steps=20"])

Every section is a frozen dataclass; the strict layer in ``grpo_jax.config`` rejects unknown keys and bad values
with one error naming the dotted key. Checks that need the devices (batch vs mesh) run in ``loop.validate``,
still before any compute.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from grpo_jax.algorithms import AlgoConfig, algorithm_class
from grpo_jax.config import ConfigError, from_yaml
from grpo_jax.data import DataConfig
from grpo_jax.group_size import DynamicGroupConfig
from grpo_jax.layout import LayoutChoice
from grpo_jax.mesh import make_mesh
from grpo_jax.models import ModelConfig
from grpo_jax.models.config import LoRAConfig
from grpo_jax.optim import OptimConfig
from grpo_jax.rewards import RewardsConfig, get_reward
from grpo_jax.sft import SFTConfig

DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The policy: ``path`` (HF folder or hub id) or ``init`` (a random model of this architecture)."""

    path: str | None = None
    init: ModelConfig | None = None
    tokenizer: str | None = None  # HF folder/hub id; "char" = the built-in character tokenizer; default: path
    ref_path: str | None = None  # frozen reference; default: a copy of the initial (warm-started) policy
    dtype: DType = "float32"  # compute: bfloat16 with float32 params is mixed precision (float32 master weights)
    param_dtype: DType = "float32"
    # params stored in bfloat16 need this set: true keeps a float32 master copy that the optimizer updates (its
    # moments in float32 too; the params are its rounding), false updates the bfloat16 params themselves (an update
    # below ~0.4% of a weight, e.g. lr 1e-6, rounds away)
    master_weights: bool | None = None
    # LoRA adapters (rank, alpha, dropout, targets) on the policy after its warm start; the base weights stay frozen
    # and, adapter off, are the reference (no second copy), unless model.ref_path names another one
    lora: LoRAConfig | None = None
    remat: bool = False
    scan_layers: bool = True  # False: unroll the decoder layers (compile time grows with depth; faster steps on CPU)

    def __post_init__(self):
        if (self.path is None) == (self.init is None):
            raise ValueError("set exactly one of model.path (pretrained) and model.init (random init)")
        if self.param_dtype != "float32" and self.master_weights is None and self.lora is None:
            raise ValueError(f"model.param_dtype={self.param_dtype} stores the trained params in {self.param_dtype}: "
                             "set model.master_weights=true (a float32 master copy; recommended) or false (updates "
                             "below its resolution round away), or keep param_dtype=float32 with dtype=bfloat16")
        if self.param_dtype == "float32" and self.master_weights is not None:
            raise ValueError("model.master_weights applies to param_dtype=bfloat16 only (float32 params are the "
                             "master weights); leave it unset")
        if self.tokenizer is None and self.path is None:
            raise ValueError("model.tokenizer is required with model.init (e.g. 'char' or a tokenizer folder)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartSection:
    """Supervised warm start on the training split before GRPO: target text = ``target.format(**example)``.

    ``flawed_target`` with ``flawed_fraction`` = f: a seeded fraction f of the distinct training questions get
    ``flawed_target.format(**example)`` instead (e.g. arith's ``{no_carry_answer}``), always the same ones: warm-start
    data with a systematic error, which imitation learns and a verifiable reward can remove.

    ``tail_max`` = K > 0 appends ``tail_char`` repeated k times to each target, k drawn uniformly from 0..K once per
    question (seeded from ``sft.seed``), and ``flawed_tail_max`` (default K) does the same for the flawed targets: a
    tail that does not change the answer but lets the length depend on it. With a longer flawed tail the wrong
    answers are the long ones ("wrong versions can be long"), the setting of GRPO's length bias: 1/|o_i| weighs a
    long wrong answer's penalty less (the length-bias ablation).
    """

    sft: SFTConfig
    target: str = "{answer}"
    flawed_target: str | None = None
    flawed_fraction: float = 0.0
    tail_max: int = 0
    flawed_tail_max: int | None = None
    tail_char: str = "."

    def __post_init__(self):
        if not 0.0 <= self.flawed_fraction <= 1.0:
            raise ValueError(f"flawed_fraction must be in [0, 1], got {self.flawed_fraction}")
        if (self.flawed_target is None) != (self.flawed_fraction == 0.0):
            raise ValueError("set flawed_target and a flawed_fraction > 0 together (or neither)")
        if self.tail_max < 0 or (self.flawed_tail_max or 0) < 0:
            raise ValueError(f"warm_start.tail_max and flawed_tail_max must be >= 0, got {self.tail_max}, "
                             f"{self.flawed_tail_max}")
        if len(self.tail_char) != 1 or self.tail_char.isdigit() or self.tail_char.isspace():
            raise ValueError(f"warm_start.tail_char must be one non-digit, non-space character, got {self.tail_char!r}")

    def completion_fn(self, examples: list[dict]):
        """example -> SFT target text, with the flawed questions chosen once from ``sft.seed``."""
        questions = sorted({ex["question"] for ex in examples})
        rng = np.random.default_rng(self.sft.seed)
        chosen = rng.random(len(questions)) < self.flawed_fraction
        flawed = {q for q, c in zip(questions, chosen) if c}
        flawed_max = self.tail_max if self.flawed_tail_max is None else self.flawed_tail_max
        tails = {}
        if self.tail_max or flawed_max:
            u = rng.random(len(questions))  # k = floor(u·(K+1)): one draw per question for either target
            tails = {q: int(x * ((flawed_max if q in flawed else self.tail_max) + 1)) for q, x in zip(questions, u)}

        def target(ex: dict) -> str:
            template = self.flawed_target if ex["question"] in flawed else self.target
            try:
                text = template.format(**ex)
            except KeyError as e:
                raise ValueError(
                    f"warm_start target {template!r} uses field {e}; the examples have {sorted(ex)}") from None
            return text + self.tail_char * tails.get(ex["question"], 0)

        return target


RolloutMode = Literal["sync", "one_step_off", "async"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Mesh axis sizes (one may be -1: the remaining devices) over ``num_devices`` devices (default all from
    ``first_device`` on) starting at ``first_device`` of ``jax.devices()``."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int | None = None
    first_device: int = 0

    def build(self):
        import jax

        devices = jax.devices()
        if not 0 <= self.first_device < len(devices):
            raise ValueError(f"first_device={self.first_device}, but {len(devices)} devices are present")
        count = len(devices) - self.first_device if self.num_devices is None else self.num_devices
        if not 1 <= count <= len(devices) - self.first_device:
            raise ValueError(f"num_devices={self.num_devices} from first_device={self.first_device}, but "
                             f"{len(devices)} devices are present")
        start = self.first_device
        return make_mesh(self.data, self.fsdp, self.tensor, devices=devices[start:start + count])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSection:
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_prompt_bucket: int = 16
    # True: every prompt is padded to the training split's longest (bucketed), so the rollout and the update keep one
    # shape for the whole run (no recompiles after the first step), at the cost of padding short prompts
    fixed_prompt_len: bool = False
    dynamic_group: DynamicGroupConfig | None = None  # per-prompt group sizes within the same P·G rows
    # model.lora: sample from a copy of the base weights with the adapters merged in, made after every update
    # (1.17x faster sampling on CPU, benchmarks/lora_sampler.py; one more copy of the weights during the rollout),
    # or false: from the LoRA model itself, the adapters applied in every decode step (no copy)
    merge_lora: bool = True
    # sync: sample batch n with the params after n updates. one_step_off / async: sample it in a background thread
    # with the params of max(0, n - k) updates, k = 1 / max_staleness, while the updates run (grpo_jax.pipeline)
    mode: RolloutMode = "sync"
    max_staleness: int = 1  # async only: how many updates old a sample may be (0: the sync schedule, pipelined)
    dtype: DType | None = None  # the sampler's params and compute dtype (null: the trainer's), e.g. bfloat16
    # the sampler's own mesh (null: the trainer's), e.g. {first_device: 4, num_devices: 4} beside a trainer on
    # mesh.num_devices=4: params are resharded onto it for every batch, the samples back onto the trainer's
    mesh: MeshSection | None = None

    def __post_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1 or not self.temperature > 0:
            raise ValueError("rollout: group_size, max_new_tokens >= 1 and temperature > 0 are required")
        if self.mode not in get_args(RolloutMode):
            raise ValueError(f"rollout.mode must be one of {get_args(RolloutMode)}, got {self.mode!r}")
        if self.max_staleness < 0 or (self.mode != "async" and self.max_staleness != 1):
            raise ValueError(f"rollout.max_staleness (>= 0) applies to rollout.mode=async only, got "
                             f"{self.max_staleness} with mode={self.mode!r}")

    @property
    def depth(self) -> int:
        """k: batch n is sampled with the params after max(0, n - k) updates."""
        return {"sync": 0, "one_step_off": 1}.get(self.mode, self.max_staleness)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int
    batch_prompts: int  # prompts per step; the batch is batch_prompts * group_size sequences
    num_iterations: int = 1  # μ updates per rollout batch
    micro_batches: int = 1
    kl_in_reward: bool = False  # β·KL as a per-token reward instead of a loss term
    ref_refresh_every: int | None = None  # copy the policy into the reference every N steps
    # DAPO's dynamic sampling: generate further rounds of batch_prompts prompts (at most dynamic_sampling_rounds
    # extra) until the batch holds batch_prompts groups whose rewards differ, and train on exactly those
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    mask_zero_variance: bool = False  # zero-variance groups stay in the batch but carry no loss (and no denominator)
    log_entropy: bool = True
    logprob_chunk: int = 128
    grad_variance: bool = False  # log train/grad_var, train/grad_rel_var over the micro-batches (whole prompts)
    log_memory: bool = False  # memory/*: XLA's analysis of the compiled train step (first step), device peak (GPU/TPU)
    layout: LayoutChoice = "auto"  # padded, packed, shared_prompt (grpo_jax.layout); auto: layout.auto_layout picks

    def __post_init__(self):
        if self.steps < 1 or self.batch_prompts < 1 or self.num_iterations < 1 or self.micro_batches < 1:
            raise ValueError("train: steps, batch_prompts, num_iterations and micro_batches must be >= 1")
        if self.ref_refresh_every is not None and self.ref_refresh_every < 1:
            raise ValueError(f"train.ref_refresh_every must be >= 1 or null, got {self.ref_refresh_every}")
        if self.dynamic_sampling_rounds < 0:
            raise ValueError(f"train.dynamic_sampling_rounds must be >= 0, got {self.dynamic_sampling_rounds}")
        if self.dynamic_sampling and self.mask_zero_variance:
            raise ValueError("train.dynamic_sampling (refill the batch with groups that carry signal) and "
                             "train.mask_zero_variance (keep them, masked) are alternatives: set one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    every: int = 0  # 0: only before the first and after the last step
    num_examples: int = 128
    batch_prompts: int = 64
    pass_k: int = 0  # > 0: also pass@k, mean@k and maj@k with k samples at the rollout temperature
    correct_reward: str | None = None  # reward whose value > 0 means correct; default: the first in rewards.fns


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 50
    keep: int = 2
    async_save: bool = True
    export_hf: bool = True  # save the final policy as an HF folder (run_dir/final)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    seed: int = 0
    model: ModelSection
    data: DataConfig
    rewards: RewardsConfig
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    train: TrainSection
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    warm_start: WarmStartSection | None = None

    def __post_init__(self):
        algorithm_class(self.algo.kind).check_config(self)  # each kind's own rules
        if self.train.layout not in ("padded", "auto") and not algorithm_class(self.algo.kind).packs:
            raise ValueError(f"train.layout={self.train.layout!r} is not implemented for algo.kind="
                             f"{self.algo.kind!r} (its forward reads the padded rows); use train.layout=padded")
        G = self.rollout.group_size
        names = [f.name for f in self.rewards.fns]
        if self.eval.correct_reward is not None and self.eval.correct_reward not in names:
            raise ValueError(f"eval.correct_reward={self.eval.correct_reward!r} is not in rewards.fns {names}")
        if self.train.ref_refresh_every is not None and self.model.ref_path is not None:
            raise ValueError("train.ref_refresh_every copies the policy into the reference; "
                             "it cannot be used with model.ref_path")
        if self.train.ref_refresh_every is not None and self.model.lora is not None and self.model.ref_path is None:
            raise ValueError("train.ref_refresh_every with model.lora: the reference is the base weights themselves "
                             "(the adapter off), which never change; unset one of them")
        if self.train.grad_variance and self.train.micro_batches < 2:
            raise ValueError("train.grad_variance compares micro-batch gradients; set train.micro_batches >= 2")
        dyn = self.rollout.dynamic_group
        if self.train.dynamic_sampling and (self.rollout.mode != "sync" or dyn is not None):
            raise ValueError("train.dynamic_sampling draws as many prompts as each step needs: it needs "
                             f"rollout.mode=sync and no rollout.dynamic_group, got mode={self.rollout.mode!r}")
        if dyn is not None and self.rollout.mode != "sync":
            raise ValueError(f"rollout.dynamic_group sizes each batch from the results of the one before; it needs "
                             f"rollout.mode=sync, got {self.rollout.mode!r}")
        if dyn is not None:
            if dyn.min_size > G:
                raise ValueError(f"rollout.dynamic_group.min_size={dyn.min_size} must be <= rollout.group_size={G} "
                                 "(the step still has batch_prompts * group_size rows)")
            group_rewards = [f.name for f in self.rewards.fns if get_reward(f.name).kind != "sample"]
            if group_rewards:
                raise ValueError(f"rollout.dynamic_group: group/batch rewards {group_rewards} need fixed groups")

    @property
    def correct_reward(self) -> str:
        return self.eval.correct_reward or self.rewards.fns[0].name


def load_experiment(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Load ``experiments/<name>`` (its config.yaml) or a YAML file, with dotted overrides."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment config (expected experiments/<name>/config.yaml)")
    return from_yaml(ExperimentConfig, path, overrides)
