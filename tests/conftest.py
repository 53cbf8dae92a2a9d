"""Test setup: 8 host CPU devices, so sharding is exercised for real.

XLA_FLAGS must be set before jax is first imported, which is why this lives at the top of conftest.
"""
import atexit
import os
import shutil
import tempfile

from grpo_jax.start import with_cpu_devices  # noqa: E402 (imports no jax)

# LLVM's optimisation passes off: compiling is most of the suite's time, and the tiny programs run fast unoptimised
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
os.environ.update(with_cpu_devices(os.environ, 8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In-process `cli.main` calls get a compilation cache of their own, never the user's (~/.cache/grpo_jax), whose
# executables may come from another machine; tests that want a cache pass GRPO_JAX_CACHE explicitly.
os.environ["GRPO_JAX_CACHE"] = tempfile.mkdtemp(prefix="grpo_jax_test_xla_")
atexit.register(shutil.rmtree, os.environ["GRPO_JAX_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The whole suite shares that cache: identical programs compiled by different tests (the same tiny model's passes)
# are compiled once (measured on 4 test files: 212 -> 181 s).
jax.config.update("jax_compilation_cache_dir", os.environ["GRPO_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
