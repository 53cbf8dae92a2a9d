"""Run metrics: one JSONL line per step, TensorBoard scalars, and a count of XLA compilations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
from jax import monitoring

_COMPILES = [0]


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """XLA backend compilations in this process so far (every jitted function and eager op shape)."""
    return _COMPILES[0]


TIMING_KEYS = ("time/", "throughput/", "compiles", "memory/")  # metrics that legitimately differ between identical runs


def compiled_stats(jitted, *args, name: str) -> dict[str, float]:
    """XLA's memory analysis of ``jitted`` compiled for ``args`` (lowering does not run it, so donated args stay
    valid), per device: ``memory/{name}/argument_bytes``, ``output_bytes``, ``temp_bytes`` and ``peak_bytes`` = arguments +
    outputs + temporaries - aliased (donated buffers reused for outputs); empty where the backend gives no analysis.
    (No FLOP count: XLA's cost analysis counts a loop body once, so a micro-batch scan would be undercounted.)"""
    compiled = jitted.lower(*args).compile()
    out = {}
    stats = compiled.memory_analysis()
    if stats is not None:
        arg, res, temp, alias = (float(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
        prefix = f"memory/{name}"
        out |= {f"{prefix}/argument_bytes": arg, f"{prefix}/output_bytes": res, f"{prefix}/temp_bytes": temp,
                f"{prefix}/peak_bytes": arg + res + temp - alias}
    return out


def tree_bytes(tree) -> float:
    """Total bytes of a pytree's arrays (e.g. a frozen reference model held on the devices)."""
    return float(sum(x.nbytes for x in jax.tree.leaves(tree)))


def device_memory() -> dict[str, float]:
    """``memory/device_peak_bytes``: the allocator's peak on the first local device (GPU/TPU); empty where the
    backend keeps no statistics (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"memory/device_peak_bytes": float(stats["peak_bytes_in_use"])} if "peak_bytes_in_use" in stats else {}


class MetricsWriter:
    """Appends ``{"step": n, ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only).

    ``truncate_after(step)`` drops lines past a resumed checkpoint, so a resumed run's file equals an uninterrupted
    one's (timing fields aside).
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in sorted(metrics.items())}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
