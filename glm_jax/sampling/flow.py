"""Flow-matching rollout of the GLM-Image DiT: CFG velocity, Euler ODE sampler, Flow-GRPO SDE sampler with
per-step log-probs, replay of one step, closed-form KL, noise keys, the i2i reference K/V and VAE decoding.

Conventions (`design/grpo_math.md` §3, `design/glm_image_architecture.md` §1.6-1.8):

* Latents are channels-last `[B, H/8, W/8, 16]` and float32 between steps; the DiT input is cast to the DiT
  dtype and its output back to float32 (the pipeline's `.float()`), so every update below is float32
  arithmetic.
* Flow convention `x_sigma = (1 - sigma) x0 + sigma eps`, the DiT predicts `v ~ eps - x0`; sigma falls 1 -> 0.
  The DiT is conditioned on `schedule.timesteps[k]` (= t_k - 1, unshifted) while the updates use the shifted
  sigmas.
* CFG (`velocity`): `v = v_u + g (v_c - v_u)` in float32 when `g > 1`, exactly one (conditional) pass
  otherwise, as the pipeline's `do_classifier_free_guidance = guidance_scale > 1`. The conditional pass sees
  the glyph embeddings, the prior ids with drop False and (i2i) the reference K/V in mode "read"; the
  unconditional pass sees the negative glyph embeddings (glyph of "", `[B, 1, D]`), drop True, and mode
  "skip". The two passes are TWO DiT calls, not one concatenated batch: the DiT attends to every glyph
  position (no mask), so padding the negative to the conditional length would change v_u, and the reference
  keys may only reach the conditional rows. Rollout and replay both go through `velocity`, so they batch
  identically. The unconditional branch is detached (`v = sg(v_u) + g (v_c - sg(v_u))`, Flow-GRPO's training
  form); its forward value is unchanged.
* ODE step (`FlowMatchEulerDiscreteScheduler.step`): `x <- x + (sigma_{k+1} - sigma_k) v`.
* SDE step, Flow-GRPO kernel 'sde' with noise level a, `sigma'_k = sigma_1 if sigma_k == 1 else sigma_k`:
      g_k = a sqrt(sigma_k / (1 - sigma'_k))     s_k = g_k sqrt(-dt)
      m_k = x (1 + g_k^2 dt / (2 sigma_k)) + v (1 + g_k^2 (1 - sigma_k) / (2 sigma_k)) dt
  kernel 'cps' (`x0 = x - sigma_k v`, `eps = x + (1 - sigma_k) v`):
      s_k = sigma_{k+1} sin(a pi / 2)            m_k = x0 (1 - sigma_{k+1}) + eps sqrt(sigma_{k+1}^2 - s_k^2)
  Then `x_{k+1} = m_k + s_k xi_k`. With a = 0 both are the Euler step.
* Log-prob per sample, float32, MEAN over the latent dims (§3.3), the sample `x_{k+1}` held constant:
  'sde' `lp = -mean((x' - m)^2) / (2 s^2) - log s - log sqrt(2 pi)`; 'cps' `lp = -mean((x' - m)^2)`.
  It is never evaluated where `s_k = 0` (stored as 0 there).
* Noise: the per-step noise of sample `i` at step `k` is `normal(fold_in(fold_in(root, i), k))` where `i` is
  the GLOBAL sample id (unique over hosts and devices), so no two members of a group share noise. Initial
  latents are `normal(fold_in(root_x, i))`; with `same_latent` all members of a group use `i = group id`
  instead.

Every function taking `dit` is pure and meant to run inside `jax.jit`; the loops over steps are
`lax.fori_loop`. The `*_jit` wrappers split the module (`nnx.split`) and jit over its state; guidance,
kernel and the SDE step count are static (they change the number of DiT calls or shapes), while the schedule
arrays, the noise level, the SDE mask and the step index are traced.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.layers import cast_for_compute
from glm_jax.sampling.schedule import REFERENCE_TIMESTEP, FlowSchedule

KERNELS = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class FlowCond(NamedTuple):
    """Per-batch conditioning of the DiT for one rollout (a pytree; `None` fields are absent).

    `glyph_BTD` / `neg_glyph_BTD`: conditional / negative glyph embeddings (the negative is needed when
    guidance > 1). `prior_ids_BN`: int32 AR prior ids upsampled to the DiT grid. `target_size_B2` /
    `crop_coords_B2`: float32 `(H, W)` pixels and `(top, left)`. `ref_kv`: reference K/V from `reference_kv`
    (i2i) or None (t2i).
    """

    glyph_BTD: jax.Array
    prior_ids_BN: jax.Array
    target_size_B2: jax.Array
    crop_coords_B2: jax.Array
    neg_glyph_BTD: jax.Array | None = None
    ref_kv: Any = None


def make_cond(glyph_BTD, prior_ids_BN, height: int, width: int, *, neg_glyph_BTD=None, ref_kv=None,
              crop_top_left: tuple[int, int] = (0, 0)) -> FlowCond:
    """`FlowCond` with the pipeline's `target_size = (H, W)` and `crop_coords = crops_coords_top_left`."""
    b = prior_ids_BN.shape[0]
    return FlowCond(glyph_BTD=glyph_BTD, prior_ids_BN=jnp.asarray(prior_ids_BN, jnp.int32),
                    target_size_B2=jnp.tile(jnp.asarray([[height, width]], jnp.float32), (b, 1)),
                    crop_coords_B2=jnp.tile(jnp.asarray([crop_top_left], jnp.float32), (b, 1)),
                    neg_glyph_BTD=neg_glyph_BTD, ref_kv=ref_kv)


class StepOut(NamedTuple):
    """One transition `x_k -> x_{k+1}`: mean `m_k`, std `s_k` (scalar or `[B]`) and log-prob `lp_k` `[B]`."""

    mean: jax.Array
    std: jax.Array
    logprob: jax.Array


class SdeRollout(NamedTuple):
    """Result of `sde_sample`: final latents and, for the J SDE steps in order, the stored transitions.

    `steps [J]` step indices k; `x`, `x_next`, `mean` `[B, J, h, w, c]` float32; `std [J]` s_k; `logprob [B,
    J]`.
    """

    latents: jax.Array
    steps: jax.Array
    x: jax.Array
    x_next: jax.Array
    mean: jax.Array
    std: jax.Array
    logprob: jax.Array


# ---------------------------------------------------------------------- noise keys


def sample_key(root: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """`fold_in(root, i)` for each global sample id `i` `[B]` -> keys `[B]`."""
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(sample_ids, jnp.uint32))


def step_noise(root: jax.Array, sample_ids: jax.Array, k, shape: tuple[int, ...]) -> jax.Array:
    """Noise of step `k` per sample id `i`: `normal(fold_in(fold_in(root, i), k), shape)` -> `[B, *shape]`."""
    keys = sample_key(root, sample_ids)
    k = jnp.asarray(k, jnp.uint32)
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32))(keys)


def initial_latents(root_x: jax.Array, sample_ids: jax.Array, latent_shape: tuple[int, ...], *,
                    same_latent: bool = False, group_size: int = 1) -> jax.Array:
    """x_T `[B, *latent_shape]` float32: `normal(fold_in(root_x, i))` for global sample id `i`.

    With `same_latent`, `i` is replaced by the group id `sample_id // group_size`, so all members of a group
    start from the same x_T (and different groups from different ones).
    """
    ids = jnp.asarray(sample_ids, jnp.int32)
    if same_latent:
        ids = ids // group_size
    keys = sample_key(root_x, ids)
    return jax.vmap(lambda key: jax.random.normal(key, latent_shape, jnp.float32))(keys)


def latent_shape(height: int, width: int, channels: int = 16, vae_scale: int = 8) -> tuple[int, int, int]:
    """Channels-last latent shape `(H/8, W/8, 16)` of a `height x width` image."""
    return (height // vae_scale, width // vae_scale, channels)


# ------------------------------------------------------------------------ velocity


def _dit_dtype(dit) -> Any:
    return getattr(dit, "dtype", jnp.float32)


def _timesteps_B(sched: FlowSchedule, k, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(sched.timesteps, jnp.float32)[k], (batch,))


def velocity(dit, x_BHWC: jax.Array, k, cond: FlowCond, guidance: float, sched: FlowSchedule) -> jax.Array:
    """Guided float32 velocity at step `k` (int, or `[B]` ints for per-sample steps).

    One DiT call when `guidance <= 1`; otherwise a conditional and an unconditional call combined as
    `sg(v_u) + g (v_c - sg(v_u))` (see the module docstring for why these are two calls).
    """
    b = x_BHWC.shape[0]
    x_in = x_BHWC.astype(_dit_dtype(dit))
    t_B = _timesteps_B(sched, k, b)
    drop = jnp.zeros(cond.prior_ids_BN.shape, bool)
    has_ref = cond.ref_kv is not None
    v_c, _ = dit(x_in, cond.glyph_BTD, cond.prior_ids_BN, drop, t_B, cond.target_size_B2, cond.crop_coords_B2,
                 kv_mode="read" if has_ref else "none", ref_kv=cond.ref_kv)
    v_c = v_c.astype(jnp.float32)
    if not guidance > 1:
        return v_c
    if cond.neg_glyph_BTD is None:
        raise ValueError("guidance > 1 needs cond.neg_glyph_BTD (the glyph embedding of \"\")")
    v_u, _ = dit(x_in, cond.neg_glyph_BTD, cond.prior_ids_BN, ~drop, t_B, cond.target_size_B2,
                 cond.crop_coords_B2, kv_mode="skip" if has_ref else "none", ref_kv=None)
    v_u = jax.lax.stop_gradient(v_u.astype(jnp.float32))
    return v_u + guidance * (v_c - v_u)


# --------------------------------------------------------------------- transitions


def _sigma(sched: FlowSchedule, k, ndim: int) -> tuple[jax.Array, jax.Array]:
    sig = jnp.asarray(sched.sigmas, jnp.float32)
    s, s_next = sig[k], sig[jnp.asarray(k) + 1]
    shape = jnp.shape(s) + (1,) * (ndim - jnp.ndim(s))  # [B] -> [B, 1, 1, 1]; scalar stays scalar
    return s.reshape(shape), s_next.reshape(shape)


def euler_step(x: jax.Array, v: jax.Array, sched: FlowSchedule, k) -> jax.Array:
    """The pipeline's deterministic step `x + (sigma_{k+1} - sigma_k) v` in float32."""
    sigma, sigma_next = _sigma(sched, k, x.ndim)
    return x + (sigma_next - sigma) * v


def transition_std(sched: FlowSchedule, k, noise_level, kernel: str = "sde") -> tuple[jax.Array, jax.Array]:
    """`(std_dev_t, s_k)` of step `k`: Flow-GRPO's `std_dev_t` (g_k for 'sde', s_k for 'cps') and the std s_k.

    `std_dev_t` is what Flow-GRPO's KL divides by (`kl_fg`); `s_k` is the transition's standard deviation.
    """
    sig = jnp.asarray(sched.sigmas, jnp.float32)
    sigma, sigma_next = sig[k], sig[jnp.asarray(k) + 1]
    a = jnp.asarray(noise_level, jnp.float32)
    if kernel == "sde":
        g = jnp.sqrt(sigma / (1 - jnp.where(sigma == 1, sig[1], sigma))) * a
        return g, g * jnp.sqrt(sigma - sigma_next)
    if kernel == "cps":
        s = sigma_next * jnp.sin(a * (math.pi / 2))
        return s, s
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def transition_mean(x: jax.Array, v: jax.Array, sched: FlowSchedule, k, noise_level,
                    kernel: str = "sde") -> tuple[jax.Array, jax.Array]:
    """Mean `m_k` and std `s_k` of `x_{k+1} | x_k` (float32; the Euler step and 0 when a = 0)."""
    sigma, sigma_next = _sigma(sched, k, x.ndim)
    g, s = transition_std(sched, k, noise_level, kernel)
    g = g.reshape(sigma.shape)
    if kernel == "sde":
        dt = sigma_next - sigma
        mean = x * (1 + g ** 2 / (2 * sigma) * dt) + v * (1 + g ** 2 * (1 - sigma) / (2 * sigma)) * dt
    else:
        x0 = x - sigma * v
        eps = x + (1 - sigma) * v
        mean = x0 * (1 - sigma_next) + eps * jnp.sqrt(sigma_next ** 2 - g ** 2)
    return mean, s


def gaussian_logprob(x_next: jax.Array, mean: jax.Array, std: jax.Array, kernel: str = "sde") -> jax.Array:
    """Per-sample log-prob `[B]` of `x_next` under N(mean, std^2 I), MEAN over latent dims; 0 where std == 0.

    `x_next` is held constant (stop_gradient). 'cps' uses Flow-GRPO's `-mean((x' - m)^2)` (no 1/(2 s^2), no
    constants).
    """
    x_next = jax.lax.stop_gradient(x_next)
    axes = tuple(range(1, mean.ndim))
    sq = jnp.mean(jnp.square(x_next.astype(jnp.float32) - mean), axis=axes)
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), sq.shape)
    ok = std > 0
    safe = jnp.where(ok, std, 1.0)
    if kernel == "cps":
        lp = -sq
    else:
        lp = -sq / (2 * safe ** 2) - jnp.log(safe) - _LOG_SQRT_2PI
    return jnp.where(ok, lp, 0.0)


def mean_kl(mean_a: jax.Array, mean_b: jax.Array, std) -> jax.Array:
    """Closed-form per-sample KL of two Gaussians of equal std, MEAN over latent dims: `mean(dm^2)/(2 std^2)`.

    Pass `std = s_k` for the exact KL_k, or `std = std_dev_t` (`transition_std(...)[0]`) for Flow-GRPO's KL
    (`kl_fg`), the convention its beta values were tuned in (= h_k * KL_k for 'sde').
    """
    axes = tuple(range(1, mean_a.ndim))
    std = jnp.asarray(std, jnp.float32)
    return jnp.mean(jnp.square(mean_a - mean_b), axis=axes) / (2 * std ** 2)


def kl_fg(mean_theta: jax.Array, mean_ref: jax.Array, sched: FlowSchedule, k, noise_level,
          kernel: str = "sde") -> jax.Array:
    """Flow-GRPO's KL of step `k` (divides by `std_dev_t^2`, grpo_math §3.5), per sample `[B]`."""
    std_dev_t, _ = transition_std(sched, k, noise_level, kernel)
    return mean_kl(mean_theta, mean_ref, std_dev_t)


def step_logprob(dit, x_k: jax.Array, x_next: jax.Array, k, cond: FlowCond, sched: FlowSchedule, *,
                 guidance: float = 1.0, noise_level=0.7, kernel: str = "sde") -> StepOut:
    """Recomputes `m_k`, `s_k` and `lp_k` of a stored transition (GRPO replay) by the sampler's code path.

    `k` is an int or `[B]` ints. Gradients flow into the DiT through `m_k`; `x_next` is a constant.
    """
    v = velocity(dit, x_k, k, cond, guidance, sched)
    mean, std = transition_mean(x_k, v, sched, k, noise_level, kernel)
    return StepOut(mean=mean, std=std, logprob=gaussian_logprob(x_next, mean, std, kernel))


# ------------------------------------------------------------------------ samplers


def ode_sample(dit, x_T: jax.Array, cond: FlowCond, sched: FlowSchedule, *,
               guidance: float = 1.0) -> jax.Array:
    """Deterministic Euler sampling over all N steps (the pipeline's loop) -> final float32 latents."""
    n = len(sched.timesteps)

    def body(k, x):
        return euler_step(x, velocity(dit, x, k, cond, guidance, sched), sched, k)

    return jax.lax.fori_loop(0, n, body, x_T.astype(jnp.float32))


def _num_sde(sde_mask, num_sde_steps: int | None) -> int:
    if num_sde_steps is not None:
        return int(num_sde_steps)
    if isinstance(sde_mask, jax.core.Tracer):
        raise TypeError("a traced sde_mask needs a static num_sde_steps")
    return int(np.asarray(sde_mask).sum())


def sde_sample(dit, x_T: jax.Array, cond: FlowCond, sched: FlowSchedule, noise_root: jax.Array,
               sample_ids: jax.Array, *, guidance: float = 1.0, noise_level=0.7, kernel: str = "sde",
               sde_mask=None, num_sde_steps: int | None = None) -> SdeRollout:
    """Flow-GRPO rollout: SDE steps where `sde_mask[k]` (default: every step), Euler ODE steps elsewhere.

    `sde_mask` is a bool `[N]` (host or traced; a traced mask, e.g. a random window, needs the static count
    `num_sde_steps`). Noise of sample `i` at step `k` is `step_noise(noise_root, sample_ids, k)`. For the J
    SDE steps the rollout stores `x_k`, `x_{k+1}`, `m_k`, `s_k` and `lp_k` (see `SdeRollout`); replay with
    `step_logprob`. 'cps' has `s_{N-1} = 0`: a last step in the mask is deterministic and stored with lp 0,
    so leave it out of the trained steps.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    n = len(sched.timesteps)
    if sde_mask is None:
        sde_mask = np.ones(n, bool)
    j = _num_sde(sde_mask, num_sde_steps)
    if j < 1:
        raise ValueError("sde_sample needs at least one SDE step; use ode_sample otherwise")
    mask = jnp.asarray(sde_mask, bool)
    slots = jnp.cumsum(mask.astype(jnp.int32)) - 1
    x_T = x_T.astype(jnp.float32)
    b, shape = x_T.shape[0], x_T.shape[1:]
    zeros = jnp.zeros((b, j, *shape), jnp.float32)
    init = (x_T, jnp.zeros((j,), jnp.int32), zeros, zeros, zeros, jnp.zeros((j,), jnp.float32),
            jnp.zeros((b, j), jnp.float32))

    def write(buf, slot, new, on):
        """buf[:, slot] = new where `on` (a per-slot read-select-write, in place inside the loop)."""
        idx = (0, slot) + (0,) * (buf.ndim - 2)
        old = jax.lax.dynamic_slice(buf, idx, (buf.shape[0], 1, *buf.shape[2:]))
        return jax.lax.dynamic_update_slice(buf, jnp.where(on, new[:, None], old), idx)

    def body(k, carry):
        x, steps, xs, xns, means, stds, lps = carry
        on = mask[k]
        v = velocity(dit, x, k, cond, guidance, sched)
        mean, std = transition_mean(x, v, sched, k, noise_level, kernel)
        xi = step_noise(noise_root, sample_ids, k, shape)
        x_sde = mean + std * xi
        x_next = jnp.where(on, x_sde, euler_step(x, v, sched, k))
        lp = gaussian_logprob(x_next, mean, std, kernel)
        slot = jnp.clip(slots[k], 0, j - 1)
        steps = jnp.where(on, steps.at[slot].set(k), steps)
        stds = jnp.where(on, stds.at[slot].set(std), stds)
        lps = jnp.where(on, lps.at[:, slot].set(lp), lps)
        return (x_next, steps, write(xs, slot, x, on), write(xns, slot, x_next, on),
                write(means, slot, mean, on), stds, lps)

    x, steps, xs, xns, means, stds, lps = jax.lax.fori_loop(0, n, body, init)
    return SdeRollout(latents=x, steps=steps, x=xs, x_next=xns, mean=means, std=stds, logprob=lps)


# --------------------------------------------------------------- i2i reference K/V


def _concat_kv(kvs: list) -> Any:
    """Concatenates per-source K/V pytrees along the sequence (axis 1 of `[B, S, heads, head_dim]`)."""
    if len(kvs) == 1:
        return kvs[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *kvs)


def reference_kv(dit, ref_latents, ref_prior_ids, ref_target_size) -> Any:
    """Per-layer reference K/V of the i2i source images, computed once and read at every step.

    Each source `r` (lists, or one array for a single source): normalised VAE mean latents `[B_r, h, w, 16]`,
    its x2-upsampled VQ prior ids `[B_r, (h/2)(w/2)]`, and its floored pixel size `(h*8, w*8)` (a pair or
    `[B_r, 2]`). One DiT pass per source in mode "write" with glyph length 0, drop False, timestep 0 and crop
    (0, 0), as the pipeline does; several sources are concatenated along the sequence. `B_r = 1` is broadcast
    over the batch when read; `B_r = B` gives every sample its own sources.
    """
    if not isinstance(ref_latents, (list, tuple)):
        ref_latents, ref_prior_ids, ref_target_size = [ref_latents], [ref_prior_ids], [ref_target_size]
    glyph_dim = _glyph_dim(dit)
    kvs = []
    for z, ids, size in zip(ref_latents, ref_prior_ids, ref_target_size, strict=True):
        b = z.shape[0]
        ids = jnp.asarray(ids, jnp.int32).reshape(b, -1)
        size = jnp.broadcast_to(jnp.asarray(size, jnp.float32).reshape(-1, 2), (b, 2))
        _, kv = dit(z.astype(_dit_dtype(dit)), jnp.zeros((b, 0, glyph_dim), _dit_dtype(dit)), ids,
                    jnp.zeros(ids.shape, bool), jnp.full((b,), REFERENCE_TIMESTEP, jnp.float32), size,
                    jnp.zeros((b, 2), jnp.float32), kv_mode="write", ref_kv=None)
        kvs.append(kv)
    return _concat_kv(kvs)


def _glyph_dim(dit) -> int:
    cfg = getattr(dit, "cfg", None) or getattr(dit, "config", None)
    for name in ("text_embed_dim", "glyph_dim"):
        if cfg is not None and hasattr(cfg, name):
            return int(getattr(cfg, name))
    raise AttributeError("cannot find the DiT's glyph (text_embed_dim) width on its config")


# ---------------------------------------------------------------------- VAE decode


DECODE_CHUNK = 4   # images per VAE decode pass: a 1024² bf16 decode needs several GiB of activations per image


def _chunked(fn, x_B, chunk: int):
    """`fn(x_B)` computed `chunk` rows at a time (`lax.map` over row blocks) when the batch is larger."""
    b = x_B.shape[0]
    if chunk <= 0 or b <= chunk:
        return fn(x_B)
    return jax.lax.map(lambda row: fn(row[None])[0], x_B, batch_size=chunk)


def decode_float(vae, latents_BHWC: jax.Array, chunk: int = DECODE_CHUNK) -> jax.Array:
    """Final latents -> images in [0, 1] `[B, H, W, 3]` float32, as the pipeline's `output_type="np"`.

    Latents are cast to the VAE dtype, de-normalised (`z * std_c + mean_c`), decoded (`chunk` images at a time),
    then `(x * 0.5 + 0.5)` is clamped to [0, 1] in the image dtype.
    """
    def one(z):
        return jnp.clip(vae.decode(vae.denormalize(z.astype(vae.dtype))) * 0.5 + 0.5, 0, 1).astype(jnp.float32)
    return _chunked(one, latents_BHWC, chunk)


def decode_images(vae, latents_BHWC: jax.Array, chunk: int = DECODE_CHUNK) -> jax.Array:
    """Final latents -> uint8 images `[B, H, W, 3]` (de-normalise, decode, `to_uint8`), the rewards' input;
    `chunk` images per VAE pass."""
    from glm_jax.models.vae import to_uint8
    return _chunked(lambda z: to_uint8(vae.decode(vae.denormalize(z.astype(vae.dtype)))), latents_BHWC, chunk)


# -------------------------------------------------------------------- jit wrappers


@partial(jax.jit, static_argnums=(0,), static_argnames=("guidance",))
def _ode_jit(graphdef, state, x_T, cond, sched_arrays, *, guidance):
    dit = cast_for_compute(nnx.merge(graphdef, state))
    return ode_sample(dit, x_T, cond, FlowSchedule(*sched_arrays, mu=0.0), guidance=guidance)


def _sched_arrays(sched: FlowSchedule) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(sched.timesteps, jnp.float32), jnp.asarray(sched.sigmas, jnp.float32)


def ode_sample_jit(dit, x_T, cond: FlowCond, sched: FlowSchedule, *, guidance: float = 1.0) -> jax.Array:
    """`ode_sample` jitted over the DiT state (recompiles per shape, guidance and step count)."""
    graphdef, state = nnx.split(dit)
    return _ode_jit(graphdef, state, x_T, cond, _sched_arrays(sched), guidance=float(guidance))


@partial(jax.jit, static_argnums=(0,), static_argnames=("guidance", "kernel", "num_sde_steps"))
def _sde_jit(graphdef, state, x_T, cond, sched_arrays, noise_root, sample_ids, noise_level, sde_mask, *,
             guidance, kernel, num_sde_steps):
    dit = cast_for_compute(nnx.merge(graphdef, state))
    return sde_sample(dit, x_T, cond, FlowSchedule(*sched_arrays, mu=0.0), noise_root, sample_ids,
                      guidance=guidance, noise_level=noise_level, kernel=kernel, sde_mask=sde_mask,
                      num_sde_steps=num_sde_steps)


def sde_sample_jit(dit, x_T, cond: FlowCond, sched: FlowSchedule, noise_root, sample_ids, *,
                   guidance: float = 1.0, noise_level=0.7, kernel: str = "sde", sde_mask=None,
                   num_sde_steps: int | None = None
                   ) -> SdeRollout:
    """`sde_sample` jitted over the DiT state; the mask is traced, its count static."""
    n = len(sched.timesteps)
    if sde_mask is None:
        sde_mask = np.ones(n, bool)
    j = _num_sde(sde_mask, num_sde_steps)
    graphdef, state = nnx.split(dit)
    return _sde_jit(graphdef, state, x_T, cond, _sched_arrays(sched), noise_root, jnp.asarray(sample_ids),
                    jnp.asarray(noise_level, jnp.float32), jnp.asarray(sde_mask, bool),
                    guidance=float(guidance), kernel=kernel, num_sde_steps=j)


@partial(jax.jit, static_argnums=(0,), static_argnames=("guidance", "kernel"))
def _replay_jit(graphdef, state, x_k, x_next, k, cond, sched_arrays, noise_level, *, guidance, kernel):
    dit = nnx.merge(graphdef, state)
    return step_logprob(dit, x_k, x_next, k, cond, FlowSchedule(*sched_arrays, mu=0.0), guidance=guidance,
                        noise_level=noise_level, kernel=kernel)


def step_logprob_jit(dit, x_k, x_next, k, cond: FlowCond, sched: FlowSchedule, *, guidance: float = 1.0,
                     noise_level=0.7, kernel: str = "sde") -> StepOut:
    """`step_logprob` jitted over the DiT state; `k` is traced and broadcast to `[B]` (one compile)."""
    graphdef, state = nnx.split(dit)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (x_k.shape[0],))  # same compile for shared / per-sample k
    return _replay_jit(graphdef, state, x_k, x_next, k, cond, _sched_arrays(sched),
                       jnp.asarray(noise_level, jnp.float32), guidance=float(guidance), kernel=kernel)


@partial(jax.jit, static_argnums=(0,))
def _ref_jit(graphdef, state, ref_latents, ref_prior_ids, ref_target_size):
    return reference_kv(nnx.merge(graphdef, state), ref_latents, ref_prior_ids, ref_target_size)


def reference_kv_jit(dit, ref_latents, ref_prior_ids, ref_target_size) -> Any:
    """`reference_kv` jitted over the DiT state."""
    graphdef, state = nnx.split(dit)
    return _ref_jit(graphdef, state, ref_latents, ref_prior_ids, ref_target_size)
