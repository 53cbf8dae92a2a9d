"""Run metrics: one JSONL line per step, TensorBoard scalars, and a count of XLA compilations."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import jax
from jax import monitoring

from grpo_jax import storage

_COMPILES = [0]


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """XLA backend compilations in this process so far (every jitted function and eager op shape)."""
    return _COMPILES[0]


# metrics that legitimately differ between identical runs
TIMING_KEYS = ("time/", "throughput/", "mfu/", "compiles", "memory/")


def compiled_stats(jitted, *args, name: str) -> dict[str, float]:
    """XLA's memory analysis of ``jitted`` compiled for ``args`` (lowering does not run it, so donated args stay
    valid), per device: ``memory/{name}/argument_bytes``, ``output_bytes``, ``temp_bytes`` and ``peak_bytes`` =
    arguments + outputs + temporaries - aliased (donated buffers reused for outputs); empty where the backend gives
    no analysis.
    (No FLOP count: XLA's cost analysis counts a loop body once, so a micro-batch scan would be undercounted.)"""
    compiled = jitted.lower(*args).compile()
    out = {}
    stats = compiled.memory_analysis()
    if stats is not None:
        arg, res, temp, alias = (float(getattr(stats, f"{k}_size_in_bytes"))
                                 for k in ("argument", "output", "temp", "alias"))
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
    one's (timing fields aside); lines up to ``step`` are never touched. A local file is appended line by line. An
    object store has no append: the lines are kept in memory and the whole object is rewritten by ``flush()``
    (called at every checkpoint and at close, and at most every ``flush_every_s`` seconds between them), so after a
    crash the object holds at least every line up to the last checkpoint. TensorBoard events are written to a local
    staging folder and copied to ``run_dir/tb`` at the same flushes (tensorboardX's own GCS writer does not work
    through our path layer).
    """

    def __init__(self, run_dir, *, tensorboard: bool = True, flush_every_s: float = 60.0):
        self.enabled = jax.process_index() == 0
        self.path = storage.location(run_dir) / "metrics.jsonl"
        self.remote = storage.is_remote(run_dir)
        self.flush_every_s, self._flushed_at = flush_every_s, time.monotonic()
        self._lines: list[str] = []
        self._tb_dir = os.fspath(storage.location(run_dir) / "tb")
        self._tb_stage = (tempfile.mkdtemp(prefix="grpo_jax_tb_") if self.remote and self.enabled and tensorboard
                          else None)
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(self._tb_stage or self._tb_dir)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self._lines = kept if self.remote else []
        if len(kept) < len(lines):
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in sorted(metrics.items())}
        line = json.dumps({"step": step, **clean})
        if self.remote:
            self._lines.append(line)
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
        if not self.remote or time.monotonic() - self._flushed_at > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Make everything written so far durable in the run dir."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
        if self.remote:
            self.path.write_text("".join(line + "\n" for line in self._lines))
            if self._tb_stage is not None:
                storage.upload(self._tb_stage, self._tb_dir)
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.flush()
        if self._tb_stage is not None:
            shutil.rmtree(self._tb_stage, ignore_errors=True)


def read_metrics(run_dir) -> list[dict]:
    path = storage.location(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
