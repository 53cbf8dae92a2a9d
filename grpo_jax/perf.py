"""Performance accounting: model FLOPs and bytes from the config, device peaks, and timing helpers.

MFU = (model FLOPs per second) / (device peak FLOPs per second), with model FLOPs counted from the architecture
(not from what XLA happens to execute): per token, a forward pass costs 2 FLOPs per matmul parameter plus the
attention score/value products; a training step costs 3x the forward (backward = 2x forward).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from grpo_jax.models import ModelConfig

# Dense bf16 peak FLOP/s and HBM bytes/s per chip (vendor figures). Keys are substrings of jax device_kind.
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5e": (197e12, 0.82e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v6 lite": (918e12, 1.64e12),
}


def device_peaks(device: jax.Device | None = None) -> tuple[float | None, float | None]:
    """(peak FLOP/s, peak HBM bytes/s) of a device, or (None, None) when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, peaks in PEAKS.items():
        if key.lower() in kind.lower():
            return peaks
    return None, None


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, the LM head included)."""
    E, F, N, K, H, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
    per_layer = E * N * H + 2 * E * K * H + N * H * E + 3 * E * F
    return L * per_layer + E * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """2·(matmul params) + attention (QKᵀ and AV: 2·2·N·H FLOPs per key, over ``context`` keys on average)."""
    return 2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (3x) with causal attention (mean context seq_len / 2)."""
    return 3 * forward_flops_per_token(cfg, seq_len / 2)


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: int, bytes_per_param: int = 2) -> float:
    """HBM bytes one decode step must read: every matmul weight once (the embedding gather reads only B rows), plus
    each row's K and V cache over ``context`` slots."""
    weights = matmul_params(cfg) * bytes_per_param
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * bytes_per_param
    return weights + kv


def time_runs(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``runs`` calls after ``warmup`` calls (results are blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def rates(times: list[float], work: float) -> dict[str, float]:
    """work/s at the fastest run ('min' time) and the median run."""
    return {"best": work / min(times), "median": work / statistics.median(times)}


def device_info() -> dict[str, object]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}


def compare(ours: list[float], theirs: list[float], work: float, unit: str = "tok/s") -> dict[str, object]:
    """Print and return both sides' rates (best and median run) and the ratio ours/theirs of the medians."""
    out = {"ours": rates(ours, work), "theirs": rates(theirs, work)}
    out["ratio_median"] = out["ours"]["median"] / out["theirs"]["median"]
    for side in ("ours", "theirs"):
        print(f"{side:>6}: {out[side]['best']:12,.0f} {unit} (best run)  {out[side]['median']:12,.0f} {unit} (median)")
    print(f"ratio ours/theirs (median): {out['ratio_median']:.2f}x")
    return out


def step_throughput(cfg: ModelConfig, times: dict[str, float], *, prompt_len: int, new_tokens_B, seq_tokens: float,
                    seq_len: int, updates: int, reference: bool) -> dict[str, float]:
    """Per-phase model FLOP/s of one RL step (and MFU where the device's peak is known), from the architecture:

    rollout  = prefill (every row's prompt, causal: mean context P/2) + each sampled token at its mean context
               P + n/2 (n = the row's new tokens), forward only;
    prep     = the reference forward of the batch's real tokens (``reference``), mean context S/2;
    update   = ``updates`` x forward + backward (3x) of the batch's real tokens, mean context S/2.
    ``times``: ``rollout_s``, ``prep_s``, ``train_s`` (wall seconds). Keys: ``throughput/{phase}_tflops`` and, with
    a known peak, ``mfu/{phase}`` (a fraction of one device's peak times the device count).
    """
    new_B = np.asarray(new_tokens_B, np.float64)
    per_key = forward_flops_per_token(cfg, 1) - forward_flops_per_token(cfg, 0)  # attention FLOPs per context key
    rollout = (len(new_B) * prompt_len * forward_flops_per_token(cfg, prompt_len / 2)
               + float(np.sum(new_B * (forward_flops_per_token(cfg, 0) + per_key * (prompt_len + new_B / 2)))))
    flops = {"rollout": rollout, "update": updates * seq_tokens * train_flops_per_token(cfg, seq_len)}
    if reference:
        flops["prep"] = seq_tokens * forward_flops_per_token(cfg, seq_len / 2)
    peak = device_peaks()[0]
    out = {}
    for phase, f in flops.items():
        seconds = times[f"{phase if phase != 'update' else 'train'}_s"]
        out[f"throughput/{phase}_tflops"] = f / seconds / 1e12
        if peak is not None:
            out[f"mfu/{phase}"] = f / seconds / (peak * jax.device_count())
    return out
