import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.util import CPU_XLA_FLAGS

# the CPU backend's compile-time setting, not applied where the tests run on an accelerator (the GPU-only tests,
# `JAX_PLATFORMS=cuda`), whose compiler would take it too, nor where XLA_FLAGS already sets the level
if os.environ["JAX_PLATFORMS"] == "cpu" and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()

# One persistent compilation cache for the whole run, shared by both xdist workers and every subprocess the tests
# start (they inherit the environment): many tests compile the same tiny programs (a trainer run and its resume,
# the CLI modes, the sharded runs' one-device reference). Programs that took over 0.2 s to compile are stored.
# test_train.py + test_generate.py on 2 cores: 357 s without, 305 s with. Set JAX_COMPILATION_CACHE_DIR to
# choose the directory (an empty value turns it off). The process that creates it (pytest itself, whose xdist
# workers inherit its environment) removes it at the end.
OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="glm_jax-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# The longest test files first: `make test` spreads whole files over two workers (`-n 2 --dist loadfile`), and a
# long file started last leaves the other worker idle at the end. Measured per-file times on 2 CPU cores, longest
# first; files not named keep their order after these.
LONGEST_FIRST = ("test_train.py", "test_grpo_steps.py", "test_sharding.py", "test_train_sharded.py", "test_ar.py",
                 "test_dit.py", "test_generate.py", "test_flow_sampler.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))   # stable: keeps order


def pytest_sessionfinish(session, exitstatus):
    if OWN_CACHE is not None:
        import shutil
        shutil.rmtree(OWN_CACHE, ignore_errors=True)
