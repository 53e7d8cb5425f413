import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.util import CPU_XLA_FLAGS

# the CPU backend's compile-time setting, not applied where the tests run on an accelerator (the GPU-only tests,
# `JAX_PLATFORMS=cuda`), whose compiler would take it too
if os.environ["JAX_PLATFORMS"] == "cpu" and CPU_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")
