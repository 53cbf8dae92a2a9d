"""LoRA: fresh adapters change nothing, only the adapters train, the reference is the base weights themselves (no
second copy), checkpoints hold the adapters alone, and the exports load in transformers and peft with our logits."""
import math
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from flax import nnx
from peft import PeftModel

from grpo_jax.config import ConfigError, from_dict
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.mesh import make_mesh, shard_model
from grpo_jax.models import load_hf, lora, save_hf
from grpo_jax.models.config import LoRAConfig

from loop_helpers import metrics, tiny_experiment
from tiny_hf import hf_causal_lm, left_padded, torch_forward

LORA = LoRAConfig(rank=4, alpha=8.0)


def perturbed_lora_model(folder, targets=LORA.targets, seed=1):
    """The HF model at ``folder`` with adapters whose B is random (a trained adapter, not a no-op)."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = lora.attach(shard_model(load_hf(folder), mesh), LoRAConfig(rank=4, alpha=8.0, targets=targets), seed, mesh)
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    flat = dict(nnx.to_flat_state(state))
    for i, (path, var) in enumerate(sorted(flat.items())):
        if path[-1].endswith("_lora_b"):
            flat[path] = var.replace(0.05 * jax.random.normal(jax.random.fold_in(key, i), var.shape))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_adapters_start_as_a_no_op_and_merge_exactly(tmp_path, family):
    hf_causal_lm(family).save_pretrained(tmp_path / "hf")
    base = load_hf(tmp_path / "hf")
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])  # adapters sharded like their weights (fsdp x tensor)
    tokens, mask = left_padded([20, 11], 20, seed=1)
    sharded = shard_model(load_hf(tmp_path / "hf"), mesh)
    expected = np.asarray(sharded(tokens, attention_mask_BxT=mask))
    fresh = lora.attach(sharded, LORA, 0, mesh)
    assert fresh.model.layers.q_lora_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert fresh.model.layers.q_lora_b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    np.testing.assert_array_equal(np.asarray(fresh(tokens, attention_mask_BxT=mask)), expected)  # B = 0
    trained = perturbed_lora_model(tmp_path / "hf")
    applied = np.asarray(trained(tokens, attention_mask_BxT=mask))
    assert np.abs(applied - np.asarray(base(tokens, attention_mask_BxT=mask))).max() > 1e-2  # the adapter acts
    merged = nnx.merge(nnx.split(base)[0], lora.merged_state(nnx.state(trained), trained.config))
    np.testing.assert_allclose(np.asarray(merged(tokens, attention_mask_BxT=mask)), applied, atol=1e-5)


@pytest.mark.parametrize("family, targets", [("qwen2", LORA.targets), ("qwen3", ("q", "v", "down"))])
def test_peft_adapter_folder_loads_onto_the_base_in_torch_with_our_logits(tmp_path, family, targets):
    hf_causal_lm(family).save_pretrained(tmp_path / "hf")
    ours = perturbed_lora_model(tmp_path / "hf", targets)
    save_hf(load_hf(tmp_path / "hf"), tmp_path / "base")
    lora.save_peft(nnx.state(ours, nnx.LoRAParam), ours.config, tmp_path / "adapter", str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens, mask = left_padded([20, 11], 20, seed=2)
    np.testing.assert_allclose(torch_forward(peft_model, tokens, mask),
                               np.asarray(ours(tokens, attention_mask_BxT=mask)), atol=1e-4)


def lora_run(tmp_path, name, steps=4, rollout=None, **model):
    from grpo_jax.loop import train

    cfg = tiny_experiment(mesh={"data": 1, "num_devices": 1}, eval={"num_examples": 0},
                          train={"steps": steps, "batch_prompts": 4, "log_memory": True},
                          rollout=tiny_experiment()["rollout"] | (rollout or {}),
                          rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1},
                          checkpoint={"every": 1, "keep": 4, "async_save": False, "export_hf": True})
    cfg["model"] |= model
    summary = train(from_dict(ExperimentConfig, cfg), tmp_path / name, show_progress=False)
    return metrics(tmp_path / name), summary


def stored_bytes(step_dir):
    """Bytes of the arrays an orbax checkpoint step holds, from its metadata."""
    tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


def test_lora_run_trains_adapters_only_with_a_free_reference_and_resumes(tmp_path):
    full, _ = lora_run(tmp_path, "full")
    rows, _ = lora_run(tmp_path, "lora", lora={"rank": 4, "alpha": 8.0})
    first_full, first = full[1], rows[1]
    # the reference pass reads the policy's own base weights: nothing is held beside them
    assert first["memory/reference_params_bytes"] == 0 < first_full["memory/reference_params_bytes"]
    # ... and whose arguments are those of the full run's reference pass (base params, batch): no copy is passed
    assert first["memory/reference_pass/argument_bytes"] == first_full["memory/reference_pass/argument_bytes"]
    # no base moments: the update's arguments (params + optimizer state + batch) shrink by the base's moments
    assert first["memory/train_step/argument_bytes"] < 0.6 * first_full["memory/train_step/argument_bytes"]
    assert all(np.isfinite(r["train/loss"]) for r in rows[1:])
    run_dir = tmp_path / "lora"
    base, final = load_hf(run_dir / "final_base"), load_hf(run_dir / "final")
    adapter = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "final_base")
    peft_model = PeftModel.from_pretrained(adapter, run_dir / "final_adapter").eval()
    tokens, mask = left_padded([9, 5], 9, seed=3)
    tokens = tokens % 40  # inside the char tokenizer's vocabulary
    ours = np.asarray(final(tokens, attention_mask_BxT=mask))
    assert np.abs(ours - np.asarray(base(tokens, attention_mask_BxT=mask))).max() > 0  # the adapters trained
    real = mask.astype(bool)  # pad positions' logits are meaningless (and differ)
    np.testing.assert_allclose(torch_forward(peft_model, tokens, mask)[real], ours[real], atol=1e-4)
    # a checkpoint holds the adapters and their moments, not the base: far fewer array bytes than the full run's
    # (counted from orbax's metadata: on disk, the tiny model's bytes are swamped by metadata files of varying size)
    assert stored_bytes(run_dir / "checkpoints" / "4") < 0.25 * stored_bytes(tmp_path / "full" / "checkpoints" / "4")
    for k in ("3", "4"):  # as if killed after step 2's checkpoint
        shutil.rmtree(run_dir / "checkpoints" / k)
    resumed, summary = lora_run(tmp_path, "lora", lora={"rank": 4, "alpha": 8.0})
    assert summary["start_step"] == 2
    for key in ("train/loss", "train/grad_norm", "train/kl"):
        np.testing.assert_allclose(resumed[-1][key], rows[-1][key], rtol=1e-6, err_msg=key)
    # the sampler applying the adapters instead of merging them: at step 1 (B = 0) the same samples and update
    applied, _ = lora_run(tmp_path, "applied", steps=1, rollout={"merge_lora": False}, lora={"rank": 4, "alpha": 8.0})
    for key in ("reward/total/mean", "length/mean", "train/loss", "train/grad_norm"):
        assert applied[1][key] == rows[1][key], key


def test_lora_config_errors():
    with pytest.raises(ValueError, match="a non-empty set of"):
        LoRAConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="only 0.0 is implemented"):
        LoRAConfig(dropout=0.05)
    cfg = tiny_experiment(train={"steps": 2, "batch_prompts": 4, "ref_refresh_every": 1})
    cfg["model"] |= {"lora": {"rank": 2}}
    with pytest.raises(ConfigError, match="ref_refresh_every with model.lora"):
        from_dict(ExperimentConfig, cfg)
    cfg = tiny_experiment()
    cfg["model"] |= {"lora": {"rank": 2}, "param_dtype": "bfloat16", "dtype": "bfloat16"}  # a frozen bf16 base:
    assert from_dict(ExperimentConfig, cfg).model.lora.rank == 2  # float32 adapters need no master copy
