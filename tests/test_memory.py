"""grpo_jax.memory: the estimate's arithmetic by hand, param bytes against a really sharded model, published sizes."""
import dataclasses
from pathlib import Path

import jax
import pytest
from flax import nnx

from grpo_jax.experiment import load_experiment
from grpo_jax.memory import (PUBLISHED_CONFIGS, estimate, estimate_experiment, main, mesh_sizes, model_config,
                             param_count, shard_numel)
from grpo_jax.mesh import make_mesh, shard_model
from grpo_jax.models import CausalLM, ModelConfig

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
    assert (est.params, est.optimizer, est.reference) == (4640, 2 * 4640, 4640)
    # KV cache: 2 (k,v) * L=2 * K=1 * H=4 * S=4+4 * 2 bytes = 256 per row; rows: 2 prompts * G=2 + the 2 prompt rows
    assert est.kv_cache == 256 * (4 + 2)
    # forward(T, keys) = T*(2*E*cb + max(cb*(2*N*H + 2*K*H) + N*keys*(4+cb), 3*F*cb))
    #   forward(4, 8) = 4*(32 + max(2*(16+8) + 2*8*6, 72)) = 4*(32 + 144) = 704
    # rollout work: layer slices 1024*4 = 4096 + prefill logits 2*4*16*2 = 256 + 2 prompts * forward(4, 8) = 1408
    #   + sampling 4 buffers * 4 rows * V=16 * 4 bytes = 1024
    assert est.rollout_work == 4096 + 256 + 1408 + 1024
    # reference: 4 rows * (forward(8, 8) = 8*176 = 1408, + chunk logits C=4 * V=16 * 4 = 256)
    #   + one gathered layer 512*4 = 2048 + head 8*16*2 = 256
    assert est.reference_logprobs == 4 * (1408 + 256) + 2048 + 256
    assert est.gradients == 2 * 4640  # accumulator + this micro-batch's
    # b = 4 sequences / 2 micro-batches = 2 rows, S = 8
    # values(8, 8) = 8*(8*8 + 2*(4*8 + 2*2*4 + 2*1*4 + 6*12) + 2*8*6) = 8*(64 + 256 + 96) = 3328
    # remat keeps layer inputs 2*2*8*8*2 = 512; working set 2*2*3328 = 13312;
    # head 2*(3*8*8*2 + 2*4*16*4) + 2*8*16*2 = 1792 + 512 = 2304; one layer's weights and grads 2*512*4 = 4096
    assert est.activations == 512 + 13312 + 2304 + 4096
    assert est.phases == {"rollout": 1536 + 6784, "reference": 8960, "train": 9280 + 20224}
    assert est.total == (4640 + 9280 + 4640) + (9280 + 20224)


def test_remat_beta_and_mesh_change_the_right_parts():
    base = estimate(TINY, ONE, **BATCH)
    no_remat = estimate(dataclasses.replace(TINY, remat=False), ONE, **BATCH)
    assert no_remat.activations - base.activations == 2 * 2 * 3328 - 512  # every layer's values instead of its input
    no_ref = estimate(TINY, ONE, **(BATCH | {"beta": 0.0}))
    assert (no_ref.reference, no_ref.reference_logprobs) == (0, 0)
    assert estimate(TINY, ONE, **(BATCH | {"micro_batches": 1})).gradients == 4640
    fsdp = estimate(TINY, {"data": 1, "fsdp": 2, "tensor": 1}, **BATCH)
    # embed [16, 8/2] = 64, final norm 8; per layer norms 8+8, q 32, k 16, v 16, o 32, biases 8+4+4, MLP 3*48 = 272
    assert fsdp.params == (64 + 8 + 2 * 272) * 4
    assert fsdp.kv_cache == 256 * (2 + 1)  # one prompt and its 2 samples per device
    # an eval rollout of 8 greedy prompts is larger than the training one (2 prompts x 2): 8 + 8 rows
    assert estimate(TINY, ONE, **BATCH, eval_rollouts=((8, 1),)).kv_cache == 256 * 16
    with pytest.raises(ValueError, match="micro_batches=3"):
        estimate(TINY, ONE, **(BATCH | {"micro_batches": 3}))


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
