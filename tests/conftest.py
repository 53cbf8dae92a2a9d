"""Test setup: 8 host CPU devices, so sharding is exercised for real.

XLA_FLAGS must be set before jax is first imported, which is why this lives at the top of conftest.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
