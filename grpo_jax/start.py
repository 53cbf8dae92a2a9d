"""How a ``grpo-jax`` process starts: on Linux, re-executed once with glibc's hugetlb malloc tunable.

XLA:CPU allocates each execution's temporaries anew, and glibc serves every allocation over 32 MB (its largest mmap
threshold) with a fresh mmap that the kernel faults in 4 KB at a time. The update of the standard CPU workload
(``benchmarks/step_vs_trl.py``) has 156 MB of temporaries: 40,000 page faults and ~0.11 s of system time on every
step, most of the update's wall time. With ``glibc.malloc.hugetlb=1`` glibc advises transparent huge pages on those
mappings (where the kernel allows them: ``/sys/kernel/mm/transparent_hugepage/enabled`` ``madvise`` or ``always``):
~200 faults per step. The dynamic loader reads tunables only at start-up, hence the re-exec; it happens before jax
is imported. In a notebook or another program, start Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``HUGE_PAGES`` added to ``GLIBC_TUNABLES`` (other tunables kept; an explicit hugetlb
    setting wins, ``glibc.malloc.hugetlb=0`` turns it off)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return dict(environ)
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES])))


def with_cpu_devices(environ: Mapping[str, str], devices: int) -> dict[str, str]:
    """``environ`` whose ``XLA_FLAGS`` force ``devices`` host CPU devices (a child process's JAX on the CPU), its
    other XLA flags kept."""
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
    return dict(environ, XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))


def entry() -> None:
    """The ``grpo-jax`` command."""
    env = with_huge_pages(os.environ)
    if sys.platform == "linux" and env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", "grpo_jax.cli", *sys.argv[1:]], env)
    from grpo_jax.cli import main

    sys.exit(main())
