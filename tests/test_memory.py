"""grpo_jax.memory: the estimate's arithmetic by hand, against XLA's compiled memory of the loop's jitted functions,
param bytes against a really sharded model, published sizes, and the research READMEs' tables."""
import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax.algorithms import make_algorithm
from grpo_jax.experiment import load_experiment
from grpo_jax.losses import LossConfig
from grpo_jax.memory import (
    PUBLISHED_CONFIGS,
    TARGETS,
    estimate,
    estimate_experiment,
    main,
    mesh_sizes,
    model_config,
    param_count,
    shard_numel,
    table,
)
from grpo_jax.mesh import make_mesh, shard_batch, shard_model
from grpo_jax.models import CausalLM, ModelConfig
from grpo_jax.models.config import LoRAConfig
from grpo_jax.optim import OptimConfig, make_optimizer
from grpo_jax.rollout import SamplingConfig, bucket, sample
from grpo_jax.run_setup import logprob_fn
from grpo_jax.tracking import compiled_stats
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step, state_sharding

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
# V=16 E=8 F=12 L=2 N=2 K=1 H=4, q/k/v biases, tied embedding
TINY = ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=4, qkv_bias=True, tie_word_embeddings=True, dtype="bfloat16",
                   param_dtype="float32", remat=True)
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
BATCH = dict(batch_prompts=2, group_size=2, prompt_len=4, max_new_tokens=4, micro_batches=2, beta=0.04, logprob_chunk=4)


def test_tiny_estimate_by_hand():
    est = estimate(TINY, ONE, **BATCH)
    # per layer: attn_norm 8 + q 8*2*4=64 + k 8*1*4=32 + v 32 + o 64 + biases 8+4+4 + mlp_norm 8
    #   + gate/up/down 3*8*12=288 = 512
    # embedding 16*8=128 + final norm 8 + 2 layers * 512 = 1160 params, float32: 4640 bytes
    assert param_count(TINY) == 1160
    # the frozen reference in the compute dtype (bfloat16, run_setup.frozen_copy): half the bytes
    assert (est.params, est.optimizer, est.reference) == (4640, 2 * 4640, 4640 // 2)
    # KV cache: a cached token is 2 (k,v) * L=2 * K=1 * H=4 * 2 bytes = 32 per row; the prompt part once per prompt
    #   (2 rows * 4 slots) and max_new_tokens - 1 = 3 completion slots per sample row (2 prompts * G=2): 32 * 20
    assert est.kv_cache == 32 * (2 * 4 + 4 * 3) == 640
    # forward(T, keys) = T*(2*E*cb + max(N*keys*(8+cb), 3*F*cb)); forward(4, 4) = 4*(32 + max(2*4*10, 72)) = 448
    # prefill: the 2 prompt rows' cache twice 2*2*4*32 = 512 + 2 * (forward(4, 4) + last logits V*cb = 32) = 960,
    #   + the scan's slice of one layer 512*4 = 2048: 3520
    # rollout work: layer slices in cb (Decoder.split_layers) 1024*2 = 2048 + max(prefill - KV 3520 - 640 = 2880,
    #   sampling 4 buffers * 4 rows * V=16 * 4 bytes = 1024)
    assert est.rollout_work == 2048 + 2880
    # reference, b = 4 sequences / 2 micro-batches = 2 rows, S = 8, C = 4: head 8*16*2 = 256
    #   + max(2 * forward(8, 8) = 2 * 8*(32 + 160) = 3072, 2 * (hidden 2*8*8*2 = 256 + chunk logits 4*16*4 = 256))
    assert est.reference_logprobs == 256 + 3072
    assert est.gradients == 2 * 4640  # accumulator + this micro-batch's
    # values(8, 8) = 8*(N*keys*(9+cb) + cb*(6*F + 2*N*H + 2*K*H + 5*E) + 8*E)
    #   = 8*(2*8*11 + 2*(72 + 16 + 8 + 40) + 64) = 8*(176 + 272 + 64) = 4096
    # remat keeps layer inputs L*b*S*E*cb = 2*2*8*8*2 = 512, twice with 2 micro-batches (they overlap) = 1024;
    # a layer's backward: cotangents 2*8*2*(2*12 + 8) = 1024 + its values 2*4096 = 8192;
    # head: 2*(2 chunks 2*4*16*4 + hidden 2*8*8*2) + head and gradient copy 8*16*(2+4) = 1536 + 768 = 2304
    assert est.activations == 1024 + max(1024 + 8192, 2304)
    assert est.phases == {"rollout": 640 + 4928, "reference": 3328, "train": 9280 + 10240}
    assert est.total == (4640 + 9280 + 2320) + (9280 + 10240)


def test_lora_estimate_by_hand():
    est = estimate(dataclasses.replace(TINY, lora=LoRAConfig(rank=2)), ONE, **BATCH)
    # adapters per layer, A [in, 2] + B [2, out]: q 8*2 + 2*8 = 32, k and v 16 + 8 = 24 each, o 8*2 + 2*8 = 32,
    # gate and up 16 + 24 = 40 each, down 24 + 16 = 40: 232 per layer, 464 float32 params = 1856 bytes
    assert (est.params, est.optimizer, est.reference) == (4640 + 1856, 2 * 1856, 0)  # the base is the reference
    assert est.gradients == 2 * 1856  # adapters only (accumulator + this micro-batch's)
    base = estimate(TINY, ONE, **BATCH)
    # no head gradient in the head's backward (8*16*4 bytes); the layer backward is the larger term either way
    assert est.activations == base.activations and est.reference_logprobs == base.reference_logprobs


def test_remat_beta_and_mesh_change_the_right_parts():
    base = estimate(TINY, ONE, **BATCH)
    no_remat = estimate(dataclasses.replace(TINY, remat=False), ONE, **BATCH)
    # every layer's values saved (2 micro-batches * 2 layers * 2 rows * 4096) and the larger of the cotangents (1024)
    # and the head (2304), instead of the layer inputs (1024) and one layer's backward (1024 + 8192)
    assert no_remat.activations - base.activations == (2 * 2 * 2 * 4096 + 2304) - (1024 + 9216)
    no_ref = estimate(TINY, ONE, **(BATCH | {"beta": 0.0}))
    assert (no_ref.reference, no_ref.reference_logprobs) == (0, 0)
    assert estimate(TINY, ONE, **(BATCH | {"micro_batches": 1})).gradients == 4640
    fsdp = estimate(TINY, {"data": 1, "fsdp": 2, "tensor": 1}, **BATCH)
    # embed [16, 8/2] = 64, final norm 8; per layer norms 8+8, q 32, k 16, v 16, o 32, biases 8+4+4, MLP 3*48 = 272
    assert fsdp.params == (64 + 8 + 2 * 272) * 4
    assert fsdp.kv_cache == 32 * (4 + 2 * 3)  # one prompt and its 2 samples per device
    # decode holds every param gathered over fsdp, the layers in cb (1024*2 = 2048) and the rest in pb (embedding
    #   and final norm 136*4 = 544), and the [E, V] head in cb (8*16*2 = 256); one prompt row:
    #   max(prefill 2*4*32 + (448 + 32) + one layer gathered 2048 - KV 320 = 2464, sampling 4*2*16*4 = 512)
    assert fsdp.rollout_work == 2048 + 544 + 256 + 2464
    # reference: 1 row per micro-batch and device; the head's vocab split over fsdp 2 (mesh.split_vocab): [8, 16/2]
    #   in cb 128, its reshard from the param's split 64 elements x 2 = 128, a chunk's 4 rows gathered over fsdp
    #   2*4*8*2 = 128; one layer gathered in cb 512*2 = 1024; max(forward(8, 8) 1536, 256 + 256)
    assert fsdp.reference_logprobs == 128 + 128 + 128 + 1024 + 1536
    # an eval rollout of 8 greedy prompts is larger than the training one (2 prompts x 2 samples)
    assert estimate(TINY, ONE, **BATCH, eval_rollouts=((8, 1),)).kv_cache == 32 * 8 * (4 + 3)
    with pytest.raises(ValueError, match="micro_batches=3"):
        estimate(TINY, ONE, **(BATCH | {"micro_batches": 3}))


# Against XLA's compiled memory analysis of the functions the loop runs, per device: float32 compute (XLA:CPU computes
# bf16 in float32), meshes that hold the params whole (at this commit a mesh that shards params leaves the AdamW
# moments replicated, see grpo_jax/memory.py). Three regimes: the head's float32 logit chunks, every layer's saved
# values without remat, attention over 512 positions with 2 micro-batches.
SMALL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=2,
             head_dim=32, qkv_bias=True, tie_word_embeddings=True, dtype="float32", param_dtype="float32")
RUN = dict(batch_prompts=4, group_size=8, prompt_len=128, max_new_tokens=128, micro_batches=1, beta=0.04,
           logprob_chunk=128)
COMPILED = {
    "1 device, remat, head-bound": (dict(vocab_size=16384, remat=True), 1, {}),
    "data=8, no remat, beta 0": (dict(vocab_size=4096, remat=False), 8, dict(batch_prompts=8, beta=0.0)),
    "data=2, remat, 2 micro-batches, attention-bound": (
        dict(vocab_size=4096, remat=True, num_heads=16, head_dim=16, num_kv_heads=4, intermediate_size=512), 2,
        dict(batch_prompts=2, prompt_len=256, max_new_tokens=256, micro_batches=2)),
}


def compiled_peaks(cfg: ModelConfig, data: int, run: dict) -> dict[str, float]:
    """Peak bytes per device (arguments + outputs + temporaries - aliased) of the rollout sampler, the reference pass
    and the train step, built as loop.train builds them."""
    mesh = make_mesh(data, 1, 1, devices=jax.devices()[:data])
    graphdef, params = nnx.split(shard_model(CausalLM(cfg, rngs=nnx.Rngs(0)), mesh))
    P, G, T0 = run["batch_prompts"], run["group_size"], run["prompt_len"]
    B, S, m = P * G, T0 + run["max_new_tokens"], run["micro_batches"]
    rows = -(-bucket(P, 1) // data) * data  # as rollout.generate pads the prompts
    prompts = shard_batch((np.ones((rows, T0), np.int32), np.ones((rows, T0), bool)), mesh)
    sampling = SamplingConfig(max_new_tokens=run["max_new_tokens"], num_samples=G)
    sampler = jax.jit(lambda state, t, mask, key: sample(graphdef, state, t, mask, key, cfg=sampling))
    peaks = {"rollout": compiled_stats(sampler, params, *prompts, jax.random.key(0), name="m")}
    optimizer = make_optimizer(OptimConfig(), 1)
    state = init_train_state(params, optimizer)
    step = make_train_step(graphdef, optimizer, StepConfig(micro_batches=m, logprob_chunk=run["logprob_chunk"]),
                           make_algorithm(loss=LossConfig(beta=run["beta"])), state_sharding=state_sharding(state))
    zeros, ones = np.zeros((B, S), np.float32), np.ones((B, S), bool)
    batch = shard_batch(Batch(tokens_BxS=np.ones((B, S), np.int32), attn_mask_BxS=ones, loss_mask_BxS=ones,
                              old_logp_BxS=zeros, ref_logp_BxS=zeros if run["beta"] > 0 else None,
                              adv=np.zeros(B, np.float32)), mesh)
    peaks["train"] = compiled_stats(step, state, batch, name="m")
    if run["beta"] > 0:
        reference = logprob_fn(graphdef, 1.0, run["logprob_chunk"], m)
        peaks["reference"] = compiled_stats(reference, params, batch.tokens_BxS, batch.attn_mask_BxS, name="m")
    return {phase: stats["memory/m/peak_bytes"] for phase, stats in peaks.items()}


@pytest.mark.parametrize("name", COMPILED)
def test_estimate_matches_compiled_memory(name):
    model, data, run = COMPILED[name]
    cfg, run = ModelConfig(**SMALL | model), RUN | run
    est = estimate(cfg, {"data": data, "fsdp": 1, "tensor": 1}, **run)
    # each compiled function holds its own arguments: the sampler and the train step the policy (and the step its
    # moments), the reference pass the reference params
    estimated = {"rollout": est.params + est.phases["rollout"], "reference": est.reference + est.phases["reference"],
                 "train": est.params + est.optimizer + est.phases["train"]}
    compiled = compiled_peaks(cfg, data, run)
    assert set(compiled) == {"rollout", "train"} | ({"reference"} if run["beta"] > 0 else set())
    errors = {phase: estimated[phase] / peak - 1 for phase, peak in compiled.items()}
    report = {p: f"{estimated[p] / 2**20:.1f} MiB est vs {compiled[p] / 2**20:.1f} compiled ({e:+.1%})"
              for p, e in errors.items()}
    assert all(abs(e) < 0.15 for e in errors.values()), report


def test_param_bytes_match_a_sharded_model():
    cfgs = [TINY, ModelConfig(model_type="qwen3", vocab_size=24, hidden_size=16, intermediate_size=8, num_layers=2,
                              num_heads=4, num_kv_heads=1, head_dim=4, qk_norm=True, tie_word_embeddings=False)]
    for cfg in cfgs:
        for data, fsdp, tensor in ((1, 8, 1), (1, 4, 2), (2, 2, 2)):
            model = shard_model(CausalLM(cfg, rngs=nnx.Rngs(0)), make_mesh(data, fsdp, tensor))
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            on_device0 = sum(x.addressable_shards[0].data.nbytes for x in leaves)
            sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
            assert estimate(cfg, sizes, **(BATCH | {"batch_prompts": 8, "micro_batches": 1})).params == on_device0
            assert param_count(cfg) == sum(x.size for x in leaves)


def test_shard_numel_replicates_what_does_not_divide():
    sizes = {"data": 1, "fsdp": 4, "tensor": 4}
    assert shard_numel(("layers", "embed", "kv_heads", "head_dim"), (2, 8, 2, 4), sizes) == 2 * 2 * 2 * 4  # 2 kv heads
    assert shard_numel(("vocab", "embed"), (16, 8), sizes) == 4 * 2


def test_published_param_counts():
    # model cards: Qwen2.5-0.5B 0.49B (0.36B non-embedding), Qwen2.5-1.5B 1.54B (1.31B), Qwen3-0.6B 0.6B (0.44B)
    # 0.5B: 24 layers * (896*896*2 + 896*128*2 + 3*896*4864 + biases 896+128+128 + norms 2*896) + 151936*896 + 896
    q05 = ModelConfig.from_hf_config(PUBLISHED_CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"])
    per_layer = 1_605_632 + 229_376 + 13_074_432 + 1152 + 1792
    assert param_count(q05) == 24 * per_layer + 136_134_656 + 896 == 494_032_768
    assert abs(param_count(q05) / 494e6 - 1) < 0.01
    for hub_id, total, non_embedding in (("Qwen/Qwen2.5-1.5B-Instruct", 1.54e9, 1.31e9),
                                         ("Qwen/Qwen3-0.6B", 0.6e9, 0.44e9)):
        cfg = ModelConfig.from_hf_config(PUBLISHED_CONFIGS[hub_id])
        count, embedding = param_count(cfg), cfg.vocab_size * cfg.hidden_size
        assert abs(count / total - 1) < 0.01 and abs((count - embedding) / non_embedding - 1) < 0.01


def test_mesh_sizes():
    assert mesh_sizes(1, -1, 1, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh_sizes(-1, 2, 2, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad in ((1, -1, 3, 8), (2, 2, 1, 8), (-1, -1, 1, 8)):
        with pytest.raises(ValueError, match="devices"):
            mesh_sizes(*bad)


def test_estimate_experiment_reads_the_config(capsys):
    cfg = load_experiment(EXPERIMENTS / "qwen25_05b_gsm8k")
    model = model_config(cfg)
    assert model == ModelConfig.from_hf_config(PUBLISHED_CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"])
    # 300-token prompts are padded to the 384 bucket; mesh fsdp=-1 takes all 8 devices
    direct = estimate(dataclasses.replace(model, dtype="bfloat16", remat=True), {"data": 1, "fsdp": 8, "tensor": 1},
                      batch_prompts=cfg.train.batch_prompts, group_size=cfg.rollout.group_size, prompt_len=384,
                      max_new_tokens=cfg.rollout.max_new_tokens, micro_batches=cfg.train.micro_batches,
                      beta=cfg.algo.loss.beta, logprob_chunk=cfg.train.logprob_chunk,
                      eval_rollouts=((cfg.eval.batch_prompts, 1),))
    assert estimate_experiment(cfg, model, 8, prompt_len=300) == direct
    main([str(EXPERIMENTS / "qwen25_05b_gsm8k"), "--prompt-len", "300", "mesh.data=1"])
    out = capsys.readouterr().out
    assert "| | v4-8 | v5e-8 | 1xH100 |" in out and "| mesh data x fsdp x tensor | 1x4x1 | 1x8x1 | 1x1x1 |" in out
    with pytest.raises(ValueError, match="not one of"):
        model_config(load_experiment(EXPERIMENTS / "qwen25_05b_gsm8k", ["model.path=Qwen/Unknown-7B"]))


@pytest.mark.parametrize("folder", sorted(p.name for p in EXPERIMENTS.glob("qwen*")))
def test_research_readme_tables_match_the_command(folder):
    """Each research README quotes the output of the command it shows; regenerate with that command."""
    readme = (EXPERIMENTS / folder / "README.md").read_text()
    command = re.search(rf"python -m grpo_jax.memory experiments/{folder} --prompt-len (\d+)\n", readme)
    assert command, f"{folder}/README.md shows no `python -m grpo_jax.memory` command"
    rows = table(str(EXPERIMENTS / folder), TARGETS, int(command.group(1)), []).split("\n")[2:]
    assert "\n".join(rows) in readme, f"{folder}/README.md: the table differs from the command's output"
    percents = re.findall(r"\((\d+)%\)", rows[-1])
    assert f"the estimated peak is {' / '.join(p + '%' for p in percents)} of HBM" in readme
    lora = re.search(rf"python -m grpo_jax.memory experiments/{folder} --prompt-len (\d+) '(model.lora=[^']+)' "
                     r"--target v4-8 --target v5e-8\n", readme)
    assert lora, f"{folder}/README.md shows no LoRA variant's memory command"
    targets = {name: TARGETS[name] for name in ("v4-8", "v5e-8")}
    rows = table(str(EXPERIMENTS / folder), targets, int(lora.group(1)), [lora.group(2)]).split("\n")[2:]
    assert "\n".join(rows) in readme, f"{folder}/README.md: the LoRA table differs from the command's output"
