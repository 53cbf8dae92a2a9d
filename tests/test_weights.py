"""HF import/export: save_hf round trips, both config.json rope layouts, sharded checkpoints, loading onto a mesh."""
import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from grpo_jax.mesh import make_mesh, shard_batch, shard_model
from grpo_jax.models import ModelConfig, build_model, load_hf, save_hf
from grpo_jax.models.rope import inv_frequencies

from tiny_hf import LLAMA3_ROPE, hf_causal_lm, hf_classifier, left_padded, torch_forward


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_save_hf_round_trip_loads_in_transformers_with_identical_logits(tmp_path, family):
    hf = hf_causal_lm(family)
    hf.save_pretrained(tmp_path / "hf")
    save_hf(load_hf(tmp_path / "hf"), tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(back) is type(hf) and back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    _assert_same_tensors(back, hf)
    tokens, mask = left_padded([20, 11], 20, seed=1)
    np.testing.assert_array_equal(torch_forward(back, tokens, mask), torch_forward(hf, tokens, mask))


def _assert_same_tensors(a, b):
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for name, tensor in a_state.items():
        assert (tensor == b_state[name]).all(), name


def test_save_hf_classifier_round_trip(tmp_path):
    hf = hf_classifier("qwen2", num_labels=2)
    hf.save_pretrained(tmp_path / "hf")
    save_hf(load_hf(tmp_path / "hf"), tmp_path / "ours")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours",
                                                                           attn_implementation="eager")
    _assert_same_tensors(back, hf)
    tokens, mask = left_padded([12, 5], 12, seed=2)
    np.testing.assert_array_equal(torch_forward(back, tokens, mask), torch_forward(hf, tokens, mask))


@pytest.mark.parametrize("flags", [dict(qkv_bias=True, o_bias=True, mlp_bias=True), dict(tie_word_embeddings=True)])
def test_random_llama_saved_by_us_matches_transformers(tmp_path, flags):
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=1, head_dim=8, rope_theta=500_000.0, **flags)
    ours = build_model(cfg, rngs=nnx.Rngs(3))
    save_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens, _ = left_padded([16], 16, seed=3)
    tokens = tokens % 96
    np.testing.assert_allclose(np.asarray(ours(tokens)), torch_forward(hf, tokens), atol=1e-4, rtol=0)


def _rewrite_config(folder, edit):
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_old_top_level_rope_theta_and_rope_scaling_layout(tmp_path, family):
    """Hub config.json files written before transformers 5 keep rope_theta / rope_scaling at the top level."""
    hf = hf_causal_lm(family)
    hf.save_pretrained(tmp_path)

    def to_old_layout(cfg):
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        scaling = {k: v for k, v in rope.items() if k != "rope_type"}
        cfg["rope_scaling"] = {"type": rope["rope_type"], **scaling} if rope["rope_type"] != "default" else None
        return cfg

    _rewrite_config(tmp_path, to_old_layout)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] in (1e6, 1e4)
    ours_cfg = ModelConfig.from_hf_config(config)
    expected = LLAMA3_ROPE["original_max_position_embeddings"] if family == "llama" else None
    assert (ours_cfg.rope_scaling and ours_cfg.rope_scaling.original_max_position_embeddings) == expected
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens, mask = left_padded([40, 25], 40, seed=4)
    real = mask.astype(bool)
    got = np.asarray(load_hf(tmp_path)(tokens, attention_mask_BxT=mask))
    np.testing.assert_allclose(got[real], torch_forward(reloaded, tokens, mask)[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[real], torch_forward(hf, tokens, mask)[real], atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_index(tmp_path):
    hf = hf_causal_lm("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens, _ = left_padded([10], 10, seed=5)
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path)(tokens)), torch_forward(hf, tokens), atol=1e-4, rtol=0)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        load_hf(tmp_path / "missing")
    hf_causal_lm("llama").save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        load_hf(tmp_path)
    _rewrite_config(tmp_path, lambda c: c | {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf(tmp_path)


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_sharding")
    hf_causal_lm("qwen2").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (2, 1, 4)])
def test_load_onto_mesh_shards_params_and_matches_single_device(qwen2_folder, shape):
    data, fsdp, tensor = shape
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    sharded = load_hf(qwen2_folder, mesh=mesh)
    q = sharded.model.layers.q[...]  # [L, E, N, H] = [2, 32, 4, 8]; logical (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32 // fsdp, 4 // tensor, 8)
    k = sharded.model.layers.k[...]  # 2 kv heads: split over tensor=2, replicated (not an error) over tensor=4
    assert k.addressable_shards[0].data.shape[2] == (1 if tensor == 2 else 2)
    embed = sharded.model.embed[...]  # (vocab, embed) -> (tensor, fsdp)
    assert embed.addressable_shards[0].data.size == embed.size // (fsdp * tensor)

    single = load_hf(qwen2_folder)
    assert len(single.model.embed[...].devices()) == 1
    tokens, mask = left_padded([16, 9, 16, 4, 12, 16, 1, 7], 16, seed=6)
    forward = nnx.jit(lambda m, t, a: m(t, attention_mask_BxT=a))
    expected = np.asarray(forward(single, tokens, mask))
    with jax.set_mesh(mesh):
        got = forward(sharded, *shard_batch((tokens, mask), mesh))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_shard_model_places_a_random_model(qwen2_folder):
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = shard_model(load_hf(qwen2_folder), mesh)
    gate = model.model.layers.gate[...]  # (layers, embed, mlp) -> (None, fsdp, tensor)
    assert gate.addressable_shards[0].data.shape == (2, 8, 32)


QWEN25_05B = {  # Qwen/Qwen2.5-0.5B-Instruct config.json (old layout: top-level rope_theta, no rope_scaling)
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA32_1B = {  # meta-llama/Llama-3.2-1B config.json (old layout: rope_scaling with rope_type llama3)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256,
}


@pytest.mark.parametrize("hub_config", [QWEN25_05B, LLAMA32_1B], ids=["qwen2.5-0.5b", "llama-3.2-1b"])
def test_real_hub_configs_read_and_rope_frequencies_match_transformers(hub_config):
    cfg = ModelConfig.from_hf_config(hub_config)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        (14, 2, 64) if cfg.model_type == "qwen2" else (32, 8, 64))
    assert cfg.qkv_bias == (cfg.model_type == "qwen2") and not cfg.o_bias and cfg.tie_word_embeddings
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg  # our transformers-5 layout reads back the same
    hf = transformers.AutoConfig.for_model(**hub_config)
    rope = hf.rope_parameters
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (np.arange(0, 64, 2, dtype=np.float32) / 64))
    else:
        expected = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)[0].numpy()
    np.testing.assert_allclose(inv_frequencies(cfg), expected, rtol=1e-6)
    assert (transformers.AutoConfig.for_model(**cfg.to_hf_config()).rope_parameters
            == rope | {"rope_theta": cfg.rope_theta})
