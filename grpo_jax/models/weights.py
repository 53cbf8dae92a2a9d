"""Hugging Face checkpoint import/export: one table from HF tensor names to our param paths.

``load_hf`` reads config.json + ``*.safetensors`` (single file or sharded with ``model.safetensors.index.json``),
builds the model abstractly (``nnx.eval_shape``: no random init, no memory) and creates each param with
``jax.make_array_from_callback``: every device's callback reads (memory-mapped) only the HF layer tensors its shard
covers and keeps only its slice, so the host never holds a full copy of a param per device.
``save_hf`` writes config.json (transformers-5 form) + model.safetensors that transformers loads back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from grpo_jax import storage
from grpo_jax.mesh import model_shardings
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.heads import CausalLM, SequenceClassifier, build_model

# (HF name, our param path, layout). "{i}" = layer index: those stack into the param's leading 'layers' axis.
# Layouts: "same" (identical shape), "flat" (HF 1-D, ours reshaped, e.g. bias [N*H] -> [N, H]),
# "linear" (HF nn.Linear [out, in]; ours [in, *out]), "linear2" (ours [*in (2 dims), out], the o projection).
WEIGHT_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "model.embed", "same"),
    ("model.norm.weight", "model.norm", "same"),
    ("lm_head.weight", "lm_head", "linear"),
    ("score.weight", "score", "linear"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.attn_norm", "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.q", "linear"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.k", "linear"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.v", "linear"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.o", "linear2"),
    ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.q_bias", "flat"),
    ("model.layers.{i}.self_attn.k_proj.bias", "model.layers.k_bias", "flat"),
    ("model.layers.{i}.self_attn.v_proj.bias", "model.layers.v_bias", "flat"),
    ("model.layers.{i}.self_attn.o_proj.bias", "model.layers.o_bias", "same"),
    ("model.layers.{i}.self_attn.q_norm.weight", "model.layers.q_norm", "same"),
    ("model.layers.{i}.self_attn.k_norm.weight", "model.layers.k_norm", "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.mlp_norm", "same"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.gate", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.up", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.down", "linear"),
    ("model.layers.{i}.mlp.gate_proj.bias", "model.layers.gate_bias", "same"),
    ("model.layers.{i}.mlp.up_proj.bias", "model.layers.up_bias", "same"),
    ("model.layers.{i}.mlp.down_proj.bias", "model.layers.down_bias", "same"),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints still carry


def _to_ours(hf_array: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    return (hf_array.T if layout.startswith("linear") else hf_array).reshape(shape)


def _to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "flat":
        return array.reshape(-1)
    if layout.startswith("linear"):
        in_dims = 2 if layout == "linear2" else 1
        return np.ascontiguousarray(array.reshape(int(np.prod(array.shape[:in_dims])), -1).T)
    return array


def _flat_params(state) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def _resolve_folder(path: str | os.PathLike) -> Path:
    if storage.is_remote(path):  # gs://...: read through a local copy (safetensors reads local files)
        return Path(storage.local_copy(path))
    folder = Path(path)
    if folder.is_dir():
        return folder
    name = str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name!r} is not a local folder and not a hub repo id like 'Qwen/Qwen2.5-0.5B'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"could not download {name!r} from the hub (offline? pass a local folder): {err}") from err


def _tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder} (only safetensors checkpoints are supported)")
    names = {}
    for file in files:
        with safe_open(file, "np") as f:
            names |= {name: file for name in f.keys()}
    return names


def load_hf(
    path: str | os.PathLike, *, dtype="float32", param_dtype=None, mesh: Mesh | None = None, **overrides
) -> CausalLM | SequenceClassifier:
    """Model from a HF folder (or hub id when online). ``mesh``: params placed with their logical shardings,
    else on the default device. ``param_dtype`` defaults to ``dtype``; ``overrides`` set other ModelConfig fields."""
    folder = _resolve_folder(path)
    dtype = np.dtype(dtype).name  # accept "bfloat16", jnp.bfloat16, np.float32, ...
    param_dtype = np.dtype(param_dtype or dtype).name
    cfg = ModelConfig.from_hf_config(
        json.loads((folder / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype, **overrides
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    params = _flat_params(state)
    shardings = _flat_params(model_shardings(state, mesh)) if mesh is not None else None
    files = _tensor_files(folder)
    used = set()

    def read(name: str) -> np.ndarray:
        if name not in files:
            raise KeyError(f"{folder} has no tensor {name!r} needed by this {cfg.model_type} config")
        used.add(name)
        with safe_open(files[name], "np") as f:
            return f.get_tensor(name)

    for hf_name, param_path, layout in WEIGHT_TABLE:
        if param_path not in params:
            continue
        var = params[param_path]
        shape, np_dtype = tuple(var.shape), np.dtype(cfg.params_dtype)

        def shard(index, hf_name=hf_name, layout=layout, shape=shape, np_dtype=np_dtype):
            if "{i}" not in hf_name:
                return _to_ours(read(hf_name), layout, shape)[index].astype(np_dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([_to_ours(read(hf_name.format(i=i)), layout, shape[1:])[index[1:]]
                             for i in layers]).astype(np_dtype)

        sharding = shardings[param_path].get_value() if shardings else SingleDeviceSharding(jax.devices()[0])
        var.set_value(jax.make_array_from_callback(shape, sharding, shard))
    unused = {n for n in files if n not in used and not n.endswith(_IGNORED_SUFFIXES)}
    unused -= {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if unused:
        raise ValueError(f"{folder} has tensors this {cfg.model_type} config does not use: {sorted(unused)[:8]}")
    return nnx.merge(graphdef, state)


def save_hf(model: CausalLM | SequenceClassifier, path: str | os.PathLike) -> str | os.PathLike:
    """Write config.json + model.safetensors (param dtype) into ``path`` (local or ``gs://``); transformers'
    from_pretrained loads it."""
    with storage.staged(path) as local:
        _save_local(model, Path(local))
    return path


def _save_local(model: CausalLM | SequenceClassifier, folder: Path) -> None:
    cfg: ModelConfig = model.config
    params = _flat_params(nnx.state(model, nnx.Param))
    tensors = {}
    for hf_name, param_path, layout in WEIGHT_TABLE:
        if param_path not in params:
            continue
        array = np.asarray(jax.device_get(params[param_path].get_value()))
        if "{i}" not in hf_name:
            tensors[hf_name] = _to_hf(array, layout)
        else:
            tensors |= {hf_name.format(i=i): _to_hf(array[i], layout) for i in range(cfg.num_layers)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
