"""Test-wide setup: 8 virtual CPU devices, fp32 matmuls, no network."""

import os

# Must run before JAX is imported anywhere: sharding tests need a real 8-device mesh.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity tests compare to PyTorch fp32: use full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
