"""Several JAX processes (hosts) driving one global mesh: reading arrays back to the host, and barriers.

Every process runs the same loop on the same step data: the prompt order is seeded, so each process computes the
same prompt list, places only its own rows on its own devices (``shard_batch``), and the devices of all processes
run each jitted step together. Whatever the host needs back (completions, lengths, params for an export) comes
through ``to_host``, which all-gathers when an array's shards live on other processes. Functions here that gather
or wait are collectives: every process must call them at the same point of the program.

With one process every function is a plain local operation.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_primary() -> bool:
    """Process 0: the one that writes logs, configs and exported models."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """The full value of ``x`` as numpy, on every process (a collective when ``x`` spans processes)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (e.g. a SIGTERM that reached only some hosts)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())
