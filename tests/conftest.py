import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.util import CPU_XLA_FLAGS

# the CPU backend's compile-time setting, not applied where the tests run on an accelerator (the GPU-only tests,
# `JAX_PLATFORMS=cuda`), whose compiler would take it too
if os.environ["JAX_PLATFORMS"] == "cpu" and CPU_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# The longest test files first: `make test` spreads whole files over two workers (`-n 2 --dist loadfile`), and a
# long file started last leaves the other worker idle at the end. Measured per-file times on 2 CPU cores, longest
# first; files not named keep their order after these.
LONGEST_FIRST = ("test_train.py", "test_grpo_steps.py", "test_sharding.py", "test_train_sharded.py", "test_ar.py",
                 "test_dit.py", "test_export_mesh.py", "test_generate.py", "test_flow_sampler.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))   # stable: keeps order
