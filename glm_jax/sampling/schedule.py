"""Flow-matching schedule of GLM-Image: DiT timesteps, shifted sigmas and the resolution shift `mu`.

Reproduces, bit for bit, what `GlmImagePipeline.__call__` (diffusers 0.42.1) hands to and gets back from
`FlowMatchEulerDiscreteScheduler.set_timesteps(timesteps=..., sigmas=..., mu=...)`:

    t_k   = float32(int64(linspace(T, 1, N + 1)[:-1]))      T = num_train_timesteps (1000)
    s_k   = t_k / T                                           (float32)
    mu    = sqrt(S / base_seq_len) * max_shift + base_shift   S = (H/8)(W/8)/4 DiT image tokens
    sigma = mu / (mu + (1/s - 1) ** 1.0)                      "linear" time shift, float32; then sigma_N = 0

Because the pipeline passes both `timesteps` and `sigmas`, the scheduler keeps the UNSHIFTED integers `t_k`:
the DiT is conditioned on `t_k - 1` (999, 979, ... for 50 steps) while the Euler / SDE updates use the shifted
sigmas. The arithmetic is numpy float32 in the same order as diffusers (mu a Python float, which numpy >= 2
applies as a float32 scalar): a float64-then-cast path differs from `scheduler.sigmas` by 1 ulp in some
entries, and rollout and replay must share one float32 array. The pipeline's `calculate_shift` ignores
`max_image_seq_len`.

The i2i reference pass (`reference_kv`) is conditioned on timestep 0 (not -1): `REFERENCE_TIMESTEP`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

REFERENCE_TIMESTEP = 0.0
VAE_SCALE = 8
PATCH = 2


class FlowSchedule(NamedTuple):
    """Host arrays of one (steps, height, width) schedule; passed to the jitted samplers as arrays."""

    timesteps: np.ndarray   # [N] float32, DiT time input t_k - 1
    sigmas: np.ndarray      # [N + 1] float32, sigma_0 = 1 ... sigma_N = 0
    mu: float


def image_seq_len(height: int, width: int, vae_scale: int = VAE_SCALE, patch: int = PATCH) -> int:
    """Number of DiT image tokens, `(H/8)(W/8)/4`, as the pipeline computes it (integer floors)."""
    return ((height // vae_scale) * (width // vae_scale)) // (patch ** 2)


def calculate_shift(seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25,
                    max_shift: float = 0.75) -> float:
    """`mu = sqrt(seq_len / base_seq_len) * max_shift + base_shift` (the GLM pipeline's form)."""
    return (seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def _shift(sigmas: np.ndarray, mu: float, config: dict) -> np.ndarray:
    """Step 2 of `set_timesteps`: dynamic (linear / exponential) or static shift, float32 in, float32 out."""
    if config.get("use_dynamic_shifting", False):
        if config.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / sigmas - 1) ** 1.0)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    shift = config.get("shift", 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_schedule(num_steps: int, height: int, width: int, scheduler_config: dict, *,
                  vae_scale: int = VAE_SCALE, patch: int = PATCH) -> FlowSchedule:
    """The pipeline's schedule for `num_steps` Euler steps at `height x width` pixels.

    Returns DiT timesteps `t_k - 1` (float32 `[N]`), sigmas (float32 `[N+1]`, equal to `scheduler.sigmas`) and
    `mu`. Options the GLM checkpoint does not use (karras / exponential / beta sigmas, shift_terminal,
    invert_sigmas) are rejected rather than silently ignored.
    """
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "shift_terminal"):
        if scheduler_config.get(key):
            raise ValueError(f"scheduler_config.{key}={scheduler_config[key]!r} is not supported")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n_train = scheduler_config.get("num_train_timesteps", 1000)
    t = np.linspace(n_train, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    s = np.array(t / n_train).astype(np.float32)
    mu = calculate_shift(image_seq_len(height, width, vae_scale, patch),
                         scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("base_shift", 0.25),
                         scheduler_config.get("max_shift", 0.75))
    sigmas = np.asarray(_shift(s, mu, scheduler_config), np.float32)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return FlowSchedule(timesteps=(t - np.float32(1)).astype(np.float32), sigmas=sigmas, mu=float(mu))
