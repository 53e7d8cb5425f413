"""GRPO group rollouts of GLM-Image (grpo_math §1.5), jitted with fixed shapes, returning what the update steps
(`glm_jax.grpo.train_step`) and the rewards need.

* **AR group rollout** (`ar_group_rollout`): P prompts x G samples. Each prompt row is repeated G times (rows
  `p*G .. p*G+G-1` = group p) and every row samples with its own stream `fold_in(key_tokens, sample_id)`. The
  images that score the AR are rendered by the DiT with the ODE sampler (CFG `decode_guidance`) and x_T SHARED
  within a group (`same_latent`, keyed by the group id: common random numbers, so reward differences inside a
  group come from the tokens). Returns tokens, the sampler's processed log-probs, images, group ids.
* **DiT group rollout** (`dit_group_rollout`): one AR sample per prompt (given tokens) shared by its G members;
  each member runs its own SDE trajectory (unique x_T and per-step noise, keyed by global sample ids). SDE steps:
  the first `floor(N f)` steps (`timestep_fraction` f > 0; at most N - 1, the last step stays ODE), or a window of
  W steps starting at `w ~ U{0 .. N//2 - W}` drawn from the rollout key, ODE elsewhere. Stores `x_k`,
  `x_{k+1}`, k and `lp_k` of every SDE step. Guidance off by default (`guidance=1`).
* **I2I** (image editing): the prompt rows carry the sources' VQ codes in place of their `<|image|>` placeholders
  (`source_codes` + `insert_source_codes`; the vision tower is frozen), and the DiT reads the sources' reference
  K/V (`source_reference_kv`, batch P, computed once per prompt and step and repeated over its group with
  `repeat_rows`) in the AR render, the SDE rollout and, through the stored `cond`, the update. The update treats
  the reference K/V as fixed inputs computed with the rollout's DiT params (no gradient flows through the
  reference pass).
* **Timings**: pass a dict as `timings` to get each phase's wall time (token sampling, DiT ODE / SDE, VAE
  decode); every phase is then waited for, so the numbers are honest.

Keys: `key` is split by purpose with `fold_in` (tokens 0, x_T 1, SDE noise 2, window 3); sample and group ids are
global (`first_sample_id`, `first_group_id` offset them per host / per iteration), so no two members anywhere
share noise unless asked to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.layers import cast_for_compute
from glm_jax.pipeline import (
    ArPrompts,
    as_schedule,
    initial_noise,
    latent_ids,
    prior_ids,
    sched_arrays,
    upsample_grid,
)
from glm_jax.sampling import flow
from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams, sample_keys, sample_tokens
from glm_jax.sampling.schedule import FlowSchedule
from glm_jax.sharding import constrain, gather_weights

KEY_TOKENS, KEY_LATENT, KEY_NOISE, KEY_WINDOW = 0, 1, 2, 3


def _merge(graphdef, state):
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def _sampler(graphdef, state, gather: bool):
    """The module of a sampling loop: the weights its layers use only in the compute dtype cast to it once
    (`layers.cast_for_compute`: float32 trained weights, `model.param_dtype`, sample from a bfloat16 copy; the
    outputs are the same bit for bit), then, when `gather`, its FSDP-split weights gathered once before the loop
    (`sharding.gather_weights`; the identity without a mesh)."""
    model = cast_for_compute(_merge(graphdef, state))
    if not gather:
        return model
    gd, st = nnx.split(model)
    return nnx.merge(gd, gather_weights(st))


def _rows(tree: Any, b: int, axis: int = 0) -> Any:
    """The arrays of `tree` whose dimension `axis` has the batch size `b`, pinned to the batch axes of the mesh
    (`sharding.constrain`; the identity without a mesh): the rollouts' explicit input and output shardings."""
    def one(x):
        if not hasattr(x, "shape") or len(x.shape) <= axis or x.shape[axis] != b:
            return x
        names = [None] * len(x.shape)
        names[axis] = "batch"
        return constrain(x, tuple(names))
    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------------- AR


@dataclass(frozen=True)
class ArRolloutConfig:
    """AR rollout settings: `group_size` G, the sampler's policy, and the ODE render of the reward images
    (`decode_steps`, `decode_guidance`, `same_latent`); `gather_weights`: see `sample_group_tokens`;
    `gather_dit`: the render's, see `render_tokens`."""

    group_size: int = 8
    sampling: SamplingParams = field(default_factory=SamplingParams)
    decode_steps: int = 50
    decode_guidance: float = 1.5
    same_latent: bool = True
    gather_weights: bool = True
    gather_dit: bool = True


class ArGroupRollout(NamedTuple):
    """Result of `ar_group_rollout` for B = P*G rows: the repeated prompts, tokens / sampler log-probs /
    loss mask `[B, N]`, uint8 images `[B, H, W, 3]`, group and sample ids `[B]`, and the repeated glyph
    conditions (kept for the DiT rollout of the same iteration)."""

    prompts: ArPrompts
    tokens: jax.Array
    logprobs: jax.Array
    loss_mask: jax.Array
    images: jax.Array
    group_ids: jax.Array
    sample_ids: jax.Array
    glyph: jax.Array
    neg_glyph: jax.Array | None


@partial(jax.jit, static_argnames=("graphdef", "params", "n_codes", "eos_id", "gather"))
def _ar_sample_jit(graphdef, state, input_ids, attention_mask, position_ids, decode_positions, keys, *, params,
                   n_codes, eos_id, gather=True):
    model = _sampler(graphdef, state, gather)
    b, length = input_ids.shape
    input_ids, attention_mask, keys = _rows((input_ids, attention_mask, keys), b)
    position_ids, decode_positions = _rows((position_ids, decode_positions), b, axis=1)
    cache = model.init_cache(b, length + decode_positions.shape[-1] - 2)
    return _rows(sample_tokens(model, input_ids, attention_mask, position_ids, decode_positions, keys, cache,
                               params, n_codes=n_codes, eos_id=eos_id), b)


def sample_group_tokens(ar, prompts: ArPrompts, key: jax.Array, sample_ids: jax.Array, params: SamplingParams,
                        *, n_codes: int, eos_id: int, gather: bool = True) -> tuple[jax.Array, jax.Array]:
    """`(tokens, processed log-probs)` `[B, N]` of already repeated prompt rows, row b on stream
    `fold_in(key, sample_ids[b])`. `ar` is `(graphdef, state)` (state may be a tuple of states). Under a mesh
    with `fsdp`, `gather` gathers the AR's weights once before the decode loop (`sharding.gather_weights`;
    `mesh.gather_decode` in the trainer's config)."""
    ids, mask, pos, dec = (jnp.asarray(a) for a in prompts.arrays())
    keys = sample_keys(key, ids.shape[0], jnp.asarray(sample_ids))
    return _ar_sample_jit(ar[0], ar[1], ids, mask, pos, dec, keys, params=params, n_codes=int(n_codes),
                          eos_id=int(eos_id), gather=bool(gather))


@partial(jax.jit, static_argnames=("dit_graphdef", "guidance", "layout", "height", "width", "gather"))
def _render_jit(dit_graphdef, dit_state, tokens, glyph, neg, root, ids, sched, ref_kv, *, guidance, layout, height,
                width, gather=True):
    dit = _sampler(dit_graphdef, dit_state, gather)
    b = tokens.shape[0]
    tokens, glyph, neg, ids, ref_kv = _rows((tokens, glyph, neg, ids, ref_kv), b)
    cond = flow.make_cond(glyph, prior_ids(tokens, layout), height, width,
                          neg_glyph_BTD=neg if guidance > 1 else None, ref_kv=ref_kv)
    x_T = initial_noise(root, ids, height, width)
    return _rows(flow.ode_sample(dit, x_T, cond, as_schedule(sched), guidance=guidance), b)


@partial(jax.jit, static_argnames=("vae_graphdef",))
def _decode_jit(vae_graphdef, vae_state, latents):
    return decode_rows(lambda st, z: flow.decode_images(_merge(vae_graphdef, st), z), vae_state, latents)


def decode_rows(fn, state, latents):
    """`fn(state, latents)` (a per-image decode); under a mesh whose batch axes split the rows, each device
    decodes its own rows (`shard_map`, the decoder's weights gathered to every device), so that the VAE's
    chunked decode loops over local rows only. Call inside `jax.jit`."""
    from jax.sharding import PartitionSpec

    from glm_jax.sharding import batch_spec
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(state, latents)
    spec = batch_spec(latents.shape, 0, mesh)
    if not spec or spec[0] is None:
        return fn(state, latents)
    split = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=PartitionSpec(spec[0]),
                          check_vma=False)
    return split(state, latents)


def decode_latents(vae, latents: jax.Array) -> jax.Array:
    """uint8 images `[B, H, W, 3]` of final latents by the VAE (`vae` a `(graphdef, state)` pair; one jit)."""
    return _decode_jit(vae[0], vae[1], latents)


class _Timer:
    """Adds the wall time of each phase to `timings[name]` (after blocking on its result); no-op without a dict."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.t = time.perf_counter()

    def __call__(self, name: str, result):
        if self.timings is not None:
            jax.block_until_ready(result)
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now
        return result


def render_tokens(dit, vae, tokens: jax.Array, layout: ArLayout, glyph: jax.Array, neg_glyph: jax.Array | None,
                  root: jax.Array, latent_keys: jax.Array, sched: FlowSchedule, *, height: int, width: int,
                  guidance: float, ref_kv: Any = None, timings: dict | None = None, gather: bool = True) -> jax.Array:
    """uint8 images of AR tokens by the DiT ODE (prior ids, x_T, ODE in one jit; the VAE in another). x_T of row b
    is `normal(fold_in(root, latent_keys[b]))`. `ref_kv` (I2I): the sources' reference K/V with the batch of
    `tokens` (`repeat_rows`). `timings` (a dict) gets the seconds of the ODE (`time/render_s`) and the VAE
    (`time/decode_s`) added. Under a mesh with `fsdp`, `gather` gathers the DiT's weights once before the ODE
    loop rather than per layer at every step (`sharding.gather_weights`; `mesh.gather_dit` in the trainer's
    config)."""
    timer = _Timer(timings)
    latents = timer("time/render_s", _render_jit(
        dit[0], dit[1], jnp.asarray(tokens), glyph, neg_glyph, root, jnp.asarray(latent_keys, jnp.int32),
        sched_arrays(sched), ref_kv, guidance=float(guidance), layout=layout, height=int(height),
        width=int(width), gather=bool(gather)))
    return timer("time/decode_s", decode_latents(vae, latents))


def ar_group_rollout(ar, dit, vae, prompts: ArPrompts, glyph: jax.Array, neg_glyph: jax.Array | None,
                     key: jax.Array, cfg: ArRolloutConfig, sched: FlowSchedule, *, n_codes: int, eos_id: int,
                     height: int, width: int, first_sample_id: int = 0, first_group_id: int = 0,
                     ref_kv: Any = None, timings: dict | None = None) -> ArGroupRollout:
    """P prompts (one row each in `prompts`, `glyph [P, T, D]`, `neg_glyph [P, 1, D]`) x G samples.

    `ar`, `dit`, `vae` are `(graphdef, state)` pairs (the policy being trained passes its current params).
    `sched` is the render schedule (`stack.schedule(cfg.decode_steps, H, W)`). I2I: `prompts` carry the sources'
    codes (`insert_source_codes`) and `ref_kv` is their reference K/V with batch P (`source_reference_kv`),
    repeated over each group for the render. `timings` (a dict) gets `time/ar_sample_s`, `time/render_s` and
    `time/decode_s` added (each phase is then waited for).
    """
    timer = _Timer(timings)
    g = int(cfg.group_size)
    p = prompts.input_ids.shape[0]
    rep = prompts.repeat(g)
    sample_ids = first_sample_id + jnp.arange(p * g, dtype=jnp.int32)
    group_ids = first_group_id + jnp.repeat(jnp.arange(p, dtype=jnp.int32), g)
    tokens, lps = sample_group_tokens(ar, rep, jax.random.fold_in(key, KEY_TOKENS), sample_ids, cfg.sampling,
                                      n_codes=n_codes, eos_id=eos_id, gather=cfg.gather_weights)
    timer("time/ar_sample_s", tokens)
    glyph_b = jnp.repeat(glyph, g, axis=0)
    neg_b = None if neg_glyph is None else jnp.repeat(neg_glyph, g, axis=0)
    images = render_tokens(dit, vae, tokens, prompts.layout, glyph_b, neg_b, jax.random.fold_in(key, KEY_LATENT),
                           latent_ids(sample_ids, group_ids, cfg.same_latent), sched, height=height, width=width,
                           guidance=cfg.decode_guidance, ref_kv=repeat_rows(ref_kv, g), timings=timings,
                           gather=cfg.gather_dit)
    mask = jnp.broadcast_to(jnp.asarray(prompts.layout.loss_mask()), tokens.shape)
    return ArGroupRollout(rep, tokens, lps, mask, images, group_ids, sample_ids, glyph_b, neg_b)


# --------------------------------------------------------------------------------------------------- DiT


@dataclass(frozen=True)
class DitRolloutConfig:
    """DiT rollout settings: `group_size` G, `num_steps` N, SDE `noise_level` / `kernel`, the SDE steps (a
    `timestep_fraction` f > 0: the first floor(N f) steps, at most N - 1; else a window of `sde_window` W
    steps), CFG `guidance` (1 = off), and `same_latent` (x_T shared within a group; off by default).
    `gather_weights`: under a mesh with `fsdp`, the DiT's weights are gathered once before the sampling loop
    (`sharding.gather_weights`, the DiT's full size on every device while it samples) instead of per layer at
    every step (`mesh.gather_dit` in the trainer's config)."""

    group_size: int = 16
    num_steps: int = 10
    noise_level: float = 0.7
    kernel: str = "sde"
    sde_window: int = 3
    timestep_fraction: float = 0.0
    guidance: float = 1.0
    same_latent: bool = False
    gather_weights: bool = True

    @property
    def num_sde_steps(self) -> int:
        """J, the number of SDE (stored, trained) steps."""
        if self.timestep_fraction > 0:
            return max(1, min(int(self.num_steps * self.timestep_fraction), self.num_steps - 1))
        return int(self.sde_window)


def sde_step_mask(cfg: DitRolloutConfig, key: jax.Array) -> jax.Array:
    """Bool `[N]`: which steps are SDE. Fraction mode: `k < J`. Window mode: `w <= k < w + W` with
    `w ~ U{0 .. N//2 - W}` drawn from `key` (one window per rollout, shared by the batch)."""
    n, j = cfg.num_steps, cfg.num_sde_steps
    k = jnp.arange(n)
    if cfg.timestep_fraction > 0:
        return k < j
    hi = n // 2 - j
    if hi < 0:
        raise ValueError(f"sde_window {j} does not fit in the first half of {n} steps")
    w = jax.random.randint(key, (), 0, hi + 1)
    return (k >= w) & (k < w + j)


class DitGroupRollout(NamedTuple):
    """Result of `dit_group_rollout` for B = P*G members and J SDE steps: stored transitions `x`, `x_next`
    `[B, J, h, w, c]`, `steps [B, J]`, sampler `logprobs [B, J]`, final latents, uint8 images, group / sample ids
    `[B]`, the per-member `cond` (`FlowCond`), the schedule arrays and the noise level."""

    x: jax.Array
    x_next: jax.Array
    steps: jax.Array
    logprobs: jax.Array
    latents: jax.Array
    images: jax.Array
    group_ids: jax.Array
    sample_ids: jax.Array
    cond: flow.FlowCond
    sched: tuple[jax.Array, jax.Array]
    noise_level: jax.Array


@partial(jax.jit, static_argnames=("dit_graphdef", "guidance", "kernel", "num_sde", "gather"))
def _sde_jit(dit_graphdef, dit_state, x_T, cond, sched, noise_root, sample_ids, noise_level, mask, *, guidance,
             kernel, num_sde, gather=True):
    dit = _sampler(dit_graphdef, dit_state, gather)
    b = x_T.shape[0]
    x_T, cond, sample_ids = _rows((x_T, cond, sample_ids), b)
    return _rows(flow.sde_sample(dit, x_T, cond, as_schedule(sched), noise_root, sample_ids, guidance=guidance,
                                 noise_level=noise_level, kernel=kernel, sde_mask=mask, num_sde_steps=num_sde), b)


def dit_group_rollout(dit, vae, tokens: jax.Array, layout: ArLayout, glyph: jax.Array,
                      neg_glyph: jax.Array | None, key: jax.Array, cfg: DitRolloutConfig, sched: FlowSchedule, *,
                      height: int, width: int, first_sample_id: int = 0, first_group_id: int = 0,
                      ref_kv: Any = None, timings: dict | None = None) -> DitGroupRollout:
    """P AR samples (`tokens [P, N]`, `glyph [P, T, D]`) x G SDE trajectories each (group p = AR sample p).

    `sched` is the N-step schedule (`stack.schedule(cfg.num_steps, H, W)`); `dit`, `vae` `(graphdef, state)`.
    I2I: `ref_kv` is the sources' reference K/V with batch P (`source_reference_kv`), repeated over each group
    and stored in the rollout's `cond`, so the update replays the same conditioning. `timings` (a dict) gets
    `time/dit_sde_s` and `time/decode_s` added.
    """
    timer = _Timer(timings)
    g = int(cfg.group_size)
    p = tokens.shape[0]
    if len(sched.timesteps) != cfg.num_steps:
        raise ValueError(f"schedule has {len(sched.timesteps)} steps, the config {cfg.num_steps}")
    sample_ids = first_sample_id + jnp.arange(p * g, dtype=jnp.int32)
    group_ids = first_group_id + jnp.repeat(jnp.arange(p, dtype=jnp.int32), g)
    prior = jnp.repeat(prior_ids(tokens, layout), g, axis=0)
    glyph_b = jnp.repeat(glyph, g, axis=0)
    neg_b = None if (neg_glyph is None or cfg.guidance <= 1) else jnp.repeat(neg_glyph, g, axis=0)
    cond = flow.make_cond(glyph_b, prior, height, width, neg_glyph_BTD=neg_b, ref_kv=repeat_rows(ref_kv, g))
    x_T = initial_noise(jax.random.fold_in(key, KEY_LATENT), latent_ids(sample_ids, group_ids, cfg.same_latent),
                        height, width)
    mask = sde_step_mask(cfg, jax.random.fold_in(key, KEY_WINDOW))
    arrays = sched_arrays(sched)
    level = jnp.asarray(cfg.noise_level, jnp.float32)
    out = timer("time/dit_sde_s", _sde_jit(dit[0], dit[1], x_T, cond, arrays, jax.random.fold_in(key, KEY_NOISE),
                                           sample_ids, level, mask, guidance=float(cfg.guidance),
                                           kernel=cfg.kernel, num_sde=cfg.num_sde_steps,
                                           gather=cfg.gather_weights))
    images = timer("time/decode_s", decode_latents(vae, out.latents))
    steps = jnp.broadcast_to(out.steps[None], (p * g, out.steps.shape[0]))
    return DitGroupRollout(out.x, out.x_next, steps, out.logprob, out.latents, images, group_ids, sample_ids,
                           cond, arrays, level)


# ------------------------------------------------------------------------------------------- I2I sources


@partial(jax.jit, static_argnames=("ar_graphdef", "grids"))
def _codes_jit(ar_graphdef, ar_state, pixel_values, *, grids):
    return _merge(ar_graphdef, ar_state).image_tokens(pixel_values, grids)


def source_codes(ar, pixel_values: Any, grids: tuple[tuple[int, int], ...]) -> jax.Array:
    """VQ codes `[N]` (int32) of source images given as AR patch rows (`PromptBatch.pixel_values` /
    `source_grids_flat`); `ar` is a `(graphdef, state)` pair with the vision tower (never trained)."""
    grids = tuple((int(h), int(w)) for h, w in grids)
    return _codes_jit(ar[0], ar[1], jnp.asarray(pixel_values, jnp.float32), grids=grids)


def insert_source_codes(prompts: ArPrompts, codes: jax.Array, image_token_id: int) -> ArPrompts:
    """`prompts` with every `<|image|>` placeholder replaced by the sources' codes, in order (the I2I prompt the
    AR samples from and is scored on)."""
    from glm_jax.models.ar import scatter_image_codes
    ids = scatter_image_codes(jnp.asarray(prompts.input_ids), jnp.asarray(codes), int(image_token_id))
    return prompts._replace(input_ids=np.asarray(ids, np.int32))


@partial(jax.jit, static_argnames=("dit_graphdef", "vae_graphdef"))
def _source_kv_jit(dit_graphdef, dit_state, vae_graphdef, vae_state, vae_sources, codes):
    dit, vae = _merge(dit_graphdef, dit_state), _merge(vae_graphdef, vae_state)
    latents, ids, sizes = [], [], []
    for k in range(vae_sources.shape[1]):
        z = vae.normalize(vae.encode_mean(vae_sources[:, k].astype(vae.dtype)))
        latents.append(z)
        ids.append(upsample_grid(codes[:, k]))
        sizes.append((z.shape[1] * 8, z.shape[2] * 8))
    return flow.reference_kv(dit, latents, ids, sizes)


def source_reference_kv(dit, vae, vae_sources: Any, codes: Any) -> Any:
    """The I2I reference K/V of P prompts' sources, batch P: `vae_sources [P, S, h, w, 3]` in [-1, 1]
    (`PromptBatch.vae_sources`, S sources per prompt of one size) are VAE-encoded (normalised posterior mean) and
    run through the DiT in mode "write" with their x2-upsampled codes `[P, S, gh, gw]` (`flow.reference_kv`;
    several sources are concatenated along the sequence). Computed once per prompt and shared by its group."""
    return _source_kv_jit(dit[0], dit[1], vae[0], vae[1], jnp.asarray(vae_sources, jnp.float32),
                          jnp.asarray(codes, jnp.int32))


def repeat_rows(tree: Any, g: int) -> Any:
    """Every array of `tree` repeated `g` times along axis 0 (row p -> rows p*g .. p*g+g-1); None stays None."""
    if tree is None or int(g) == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, int(g), axis=0), tree)


# -------------------------------------------------------------------------------------------- to batches


def ar_batch(roll: ArGroupRollout, advantages: Any, weights: Any):
    """`train_step.ArBatch` of an AR rollout with its advantages / weights `[B]` (on-policy: no old
    log-probs; the sampler's are kept for the mismatch metric)."""
    from glm_jax.grpo.train_step import ArBatch
    pr = roll.prompts
    return ArBatch(jnp.asarray(pr.input_ids), jnp.asarray(pr.attention_mask), jnp.asarray(pr.position_ids),
                   jnp.asarray(pr.decode_positions), roll.tokens, roll.loss_mask,
                   jnp.asarray(advantages, jnp.float32), jnp.asarray(weights, jnp.float32), None, roll.logprobs)


def dit_batch(roll: DitGroupRollout, advantages: Any, weights: Any, *, old_from_rollout: bool = False):
    """`train_step.DitBatch` of a DiT rollout. `old_from_rollout` uses the sampler's stored lp as the old
    log-probs (Flow-GRPO); by default the update runs on-policy (or the trainer recomputes them)."""
    from glm_jax.grpo.train_step import DitBatch
    return DitBatch(roll.x, roll.x_next, roll.steps, jnp.asarray(advantages, jnp.float32),
                    jnp.asarray(weights, jnp.float32), roll.cond, roll.sched, roll.noise_level,
                    roll.logprobs if old_from_rollout else None, roll.logprobs)


def first_of_groups(x: jax.Array, group_size: int) -> jax.Array:
    """Rows `0, G, 2G, ...` (the first member of each group), e.g. one AR sample per prompt for the DiT rollout."""
    return jnp.asarray(x)[:: int(group_size)]


__all__ = ["ArGroupRollout", "ArRolloutConfig", "DitGroupRollout", "DitRolloutConfig", "ar_batch",
           "ar_group_rollout", "decode_latents", "dit_batch", "dit_group_rollout", "first_of_groups",
           "insert_source_codes", "render_tokens", "repeat_rows", "sample_group_tokens", "sde_step_mask",
           "source_codes", "source_reference_kv"]
