"""Test helpers: torch state dicts to numpy, loading them into glm_jax modules, error metrics."""

from __future__ import annotations

import numpy as np

# XLA's CPU backend without LLVM optimisation: the tests' tiny programs compile in about half the time, which
# outweighs their slower execution (test_train.py 296 -> 222 s, test_grpo_steps.py 359 -> 306 s on 2 cores).
# Set for the test processes by conftest.py; subprocesses that set their own XLA_FLAGS add it.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=0"
# the persistent compilation cache that conftest.py sets for the run, kept by subprocesses that clear JAX's
# other environment variables
CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def pytest_in_subprocess(path: str, xla_flags: str, *args: str, timeout: int = 600) -> str:
    """Runs the tests of `path` (narrowed by pytest `args`) in a CPU subprocess with `xla_flags` as XLA_FLAGS
    (settings a process fixes at start: simulated devices, the optimisation level); asserts that it passed and
    returns its output."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider",
                           "-W", "ignore::DeprecationWarning", *args, path], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def torch_to_numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (loop bodies, remat, custom rules) included."""
    import jax.extend.core
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from jaxpr_eqns(sub)
