"""The loaded GLM-Image stack and the pure glue between its parts: prompts -> AR tokens -> DiT prior ids, glyph
conditions, ODE decoding of given tokens to uint8 images, and the i2i reference K/V.

`GlmImageStack.load(ckpt)` reads a glm_jax checkpoint (`glm_jax.checkpoint.load_model`) into four
`(graphdef, state)` pairs (AR, DiT, VAE, T5 glyph encoder), the scheduler config and the prompt builder. Every
other function here is a pure function of arrays and split modules, so the GRPO rollout (`glm_jax.grpo.rollout`),
the trainer and a `generate` command call the same code.

    stack = GlmImageStack.load("ckpt/glm-image", dtype=jnp.bfloat16)
    prompts = stack.prompts.build_t2i(texts, 1024, 1024)                       # glm_jax.prompts.PromptBatch
    ar = ar_prompts_from_batch(prompts, ArLayout.t2i(1024, 1024))
    roll = sample_ar(*stack.ar, *ar.arrays(), key, params, n_codes=stack.n_codes, eos_id=stack.eos_id,
                     layout=ar.layout)
    glyph, neg = glyph_conditions(stack.t5, texts)
    images = decode_tokens(stack, roll.tokens, ar.layout, glyph, neg, key_x, sample_ids, num_steps=50,
                           guidance=1.5)

Token ids: inside a grid the sampler may draw image codes `0..n_codes-1` (= DiT prior ids), the final slot is
EOS. The real AR head (16512 rows) holds EOS (16385); the tiny embedded model's head has only its 128 code rows,
so there the last code row stands in for EOS and codes are `0..126` (`ar_token_ids`). The final slot never
reaches the DiT nor the teacher-forced forward, so the stand-in changes nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.config import ATTENTIONS
from glm_jax.models import positions as P
from glm_jax.models.layers import cast_for_compute
from glm_jax.sampling import flow
from glm_jax.sampling.ar_sampler import ArLayout
from glm_jax.sampling.schedule import FlowSchedule, flow_schedule

SLOTS = {"ar": "vision_language_encoder", "dit": "transformer", "vae": "vae", "t5": "text_encoder"}


class Split(NamedTuple):
    """A module as `(graphdef, state)`; `merge()` rebuilds it (inside jit: a pure function of `state`)."""

    graphdef: Any
    state: Any

    def merge(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)


def split(module: nnx.Module) -> Split:
    """`Split` of a module (graphdef + the whole state)."""
    return Split(*nnx.split(module))


# ---------------------------------------------------------------------------------------------------- stack


@dataclass
class GlmImageStack:
    """The four loaded components as `Split`s plus what generation needs besides weights.

    `ar`, `dit`, `vae`, `t5` may be None when not loaded. `scheduler_config` is the diffusers
    `scheduler_config.json` dict; `prompts` a `glm_jax.prompts.PromptBuilder` (None without a processor folder);
    `n_codes` / `eos_id` the sampler's token ids (`ar_token_ids`).
    """

    ar: Split | None
    dit: Split | None
    vae: Split | None
    t5: Split | None
    scheduler_config: dict
    prompts: Any = None
    n_codes: int = 16384
    eos_id: int = 16385
    ckpt: str = ""

    @classmethod
    def load(cls, ckpt: str, *, dtype=jnp.float32, param_dtype=None, components=("ar", "dit", "vae", "t5"),
             dit_remat: str = "none", attention: str | None = None, shardings=None, ar_remat: str = "none",
             mesh=None) -> GlmImageStack:
        """Loads a glm_jax checkpoint directory.

        `dtype` is the compute dtype of the AR and DiT (the VAE and T5 keep float32 compute, brief §6);
        `param_dtype=None` keeps the stored parameter dtypes. `dit_remat` / `ar_remat` set the DiT blocks' / AR
        text layers' rematerialisation policy (`glm_jax.models.remat`) for training; `attention` the
        `dot_product_attention` implementation of the DiT and of the AR's training pass (`set_ar_train_attention`;
        `resolve_attention` gives it for `model.attention`). `components` picks which of ar / dit / vae / t5 to
        load. `mesh`: every parameter is restored straight into its logical-axis sharding on that mesh
        (`glm_jax.sharded_load`; each process reads only its shards), as a multi-device trainer needs.
        """
        from glm_jax.checkpoint import load_model
        from glm_jax.models.remat import check_policy

        loaded: dict[str, Split | None] = dict.fromkeys(SLOTS)
        ar_cfg = None
        for name in components:
            if name not in SLOTS:
                raise ValueError(f"unknown component {name!r}; expected some of {sorted(SLOTS)}")
            comp_dtype = dtype if name in ("ar", "dit") else jnp.float32
            if mesh is not None:
                from glm_jax.sharded_load import load_checkpoint_sharded
                cfg, module = load_checkpoint_sharded(ckpt, SLOTS[name], mesh, dtype=comp_dtype,
                                                      param_dtype=param_dtype)
            else:
                cfg, module = load_model(ckpt, SLOTS[name], dtype=comp_dtype, param_dtype=param_dtype,
                                         shardings=shardings)
            if name == "dit":
                module.remat = check_policy(dit_remat)
                if attention:
                    set_dit_attention(module, attention)
            if name == "ar":
                ar_cfg = cfg
                module.text.remat = check_policy(ar_remat)
                if attention:
                    set_ar_train_attention(module, attention)
            loaded[name] = split(module)
        sched_path = os.path.join(ckpt, "scheduler", "scheduler_config.json")
        with open(sched_path) as f:
            sched_cfg = json.load(f)
        n_codes, eos_id = ar_token_ids(ar_cfg) if ar_cfg is not None else (16384, 16385)
        return cls(**loaded, scheduler_config=sched_cfg, prompts=load_prompt_builder(ckpt), n_codes=n_codes,
                   eos_id=eos_id, ckpt=ckpt)

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype=jnp.float32, dit_remat: str = "none", ar_remat: str = "none"
             ) -> GlmImageStack:
        """The embedded tiny random GLM-Image built in memory: the same configs and weights as
        `glm_jax.tiny.write_tiny_checkpoint(dst, seed)` + `load`, without the disk round trip (drawn on the default
        device: on a GPU the weights may differ in last bits from the checkpoint's, which are drawn on the CPU,
        `glm_jax.tiny.draw_backend`)."""
        from glm_jax import tiny
        from glm_jax.components import COMPONENTS
        from glm_jax.models.remat import check_policy

        loaded, ar_cfg = {}, None
        for k, (slot, make) in enumerate(tiny.TINY_CONFIGS.items()):
            spec = COMPONENTS[slot]
            cfg = spec.config_from_hf(make())
            comp_dtype = dtype if slot in (SLOTS["ar"], SLOTS["dit"]) else jnp.float32
            module = spec.model_class()(cfg, dtype=comp_dtype, rngs=nnx.Rngs(seed * 100 + k))
            name = {v: n for n, v in SLOTS.items()}[slot]
            if name == "dit":
                module.remat = check_policy(dit_remat)
            if name == "ar":
                ar_cfg = cfg
                module.text.remat = check_policy(ar_remat)
            loaded[name] = split(module)
        try:
            from glm_jax.prompts import PromptBuilder
            prompts = PromptBuilder.tiny()
        except (ImportError, AttributeError):
            prompts = None
        n_codes, eos_id = ar_token_ids(ar_cfg)
        return cls(**loaded, scheduler_config=tiny.scheduler_config(), prompts=prompts, n_codes=n_codes,
                   eos_id=eos_id)

    def schedule(self, num_steps: int, height: int, width: int) -> FlowSchedule:
        """The pipeline's fp32 flow schedule for `num_steps` at `height x width`."""
        return flow_schedule(num_steps, height, width, self.scheduler_config)


def resolve_attention(setting: str, *, dtype, backend: str, tensor: int = 1) -> str | None:
    """The `dot_product_attention` implementation that `model.attention` stands for, in the DiT (sampling and
    update) and in the AR's update pass (None: XLA's). `"xla"` / `"cudnn"` name it. `""` (the default) picks
    cuDNN's flash attention where it runs and has been checked: on GPUs with a half-precision compute `dtype`,
    on one device or a mesh that splits samples and parameters (`data` / `fsdp`); a mesh that splits heads over
    `tensor` > 1 keeps XLA's attention (cuDNN there is untested; `"cudnn"` asks for it). Otherwise XLA's
    attention (cuDNN needs a GPU and float16 / bfloat16)."""
    if setting not in ATTENTIONS:
        raise ValueError(f"model.attention={setting!r}; expected one of {ATTENTIONS}")
    if setting:
        return setting
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and half and tensor <= 1 else None


def set_dit_attention(dit, implementation: str | None) -> None:
    """The `dot_product_attention` implementation of every DiT block's joint attention (sampling and update)."""
    for block in dit.transformer_blocks:
        block.attn1.implementation = implementation


def set_ar_train_attention(ar, implementation: str | None) -> None:
    """The `dot_product_attention` implementation of the AR text layers' cache-free calls (the update's teacher-
    forced pass): `"cudnn"` makes it cuDNN's flash attention, whose memory grows with the sequence instead of its
    square. Sampling (prefill over the KV cache, one-token steps) is unchanged."""
    for layer in ar.text.layers:
        layer.self_attn.train_implementation = implementation


def load_prompt_builder(ckpt: str):
    """`glm_jax.prompts.PromptBuilder.from_dir(ckpt/processor)`, or None when that module or folder is absent."""
    proc = os.path.join(ckpt, "processor")
    try:
        from glm_jax.prompts import PromptBuilder
    except ImportError:
        return None
    return PromptBuilder.from_dir(proc) if os.path.isdir(proc) else None


def ar_token_ids(ar_cfg) -> tuple[int, int]:
    """`(n_codes, eos_id)` for the sampler: codes are the image codes that are lm_head rows, EOS the image-end id.

    When the head has no EOS row (the tiny model: 128 rows = its codes, EOS 129), its last row stands in for EOS
    and is no longer a code (see the module docstring).
    """
    vocab = ar_cfg.text.vision_vocab_size
    eos = ar_cfg.image_end_token_id
    n_codes = min(ar_cfg.image_start_token_id, vocab)
    if eos < vocab:
        return n_codes, eos
    return min(n_codes, vocab - 1), vocab - 1


# --------------------------------------------------------------------------------------------------- prompts


class ArPrompts(NamedTuple):
    """A left-padded AR prompt batch: ids / mask `[B, L]`, prefill positions `[3, B, L]`, decode positions
    `[3, B, N]` and the (static) generated layout."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    decode_positions: np.ndarray
    layout: ArLayout

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(input_ids, attention_mask, position_ids, decode_positions)`, the sampler's argument order."""
        return self.input_ids, self.attention_mask, self.position_ids, self.decode_positions

    def repeat(self, g: int) -> ArPrompts:
        """Each prompt row repeated `g` times in a row (a GRPO group: rows `p*g .. p*g+g-1`)."""
        return ArPrompts(np.repeat(self.input_ids, g, 0), np.repeat(self.attention_mask, g, 0),
                         np.repeat(self.position_ids, g, 1), np.repeat(self.decode_positions, g, 1), self.layout)

    def take(self, rows) -> ArPrompts:
        """The batch rows `rows`."""
        rows = np.asarray(rows)
        return ArPrompts(self.input_ids[rows], self.attention_mask[rows], self.position_ids[:, rows],
                         self.decode_positions[:, rows], self.layout)


def ar_prompts_from_ids(seqs: list[list[int]], image_grids: list[list], layout: ArLayout, ar_cfg,
                        pad_id: int | None = None) -> ArPrompts:
    """Left-pads token id lists and computes their M-RoPE positions (`glm_jax.models.positions`).

    `image_grids[b]`: sample b's `image_grid_thw` rows (source grids first, then the generated ones). Every
    sample must generate `layout` (checked).
    """
    pad = ar_cfg.image_end_token_id if pad_id is None else pad_id
    n = max(len(s) for s in seqs)
    ids = np.array([[pad] * (n - len(s)) + list(s) for s in seqs], np.int32)
    mask = np.array([[0] * (n - len(s)) + [1] * len(s) for s in seqs], np.int32)
    pos, start = P.prompt_position_ids(ids, mask, image_grids, ar_cfg)
    gen = P.generation_grids(ids, mask, image_grids, ar_cfg)
    if any(list(g) != layout.gen_grids for g in gen):
        raise ValueError(f"prompts generate grids {gen}, the layout expects {layout.gen_grids}")
    return ArPrompts(ids, mask, pos, np.asarray(P.decode_position_ids(start, gen), np.int32), layout)


def ar_prompts_from_batch(batch, layout: ArLayout | None = None) -> ArPrompts:
    """`ArPrompts` of a `glm_jax.prompts.PromptBatch` (or anything with `input_ids`, `attention_mask`,
    `position_ids`, `decode_position_ids`, `height`, `width`, `is_i2i`)."""
    if layout is None:
        make = ArLayout.i2i if getattr(batch, "is_i2i", False) else ArLayout.t2i
        layout = make(int(batch.height), int(batch.width))
    return ArPrompts(np.asarray(batch.input_ids, np.int32), np.asarray(batch.attention_mask, np.int32),
                     np.asarray(batch.position_ids, np.int32), np.asarray(batch.decode_position_ids, np.int32),
                     layout)


# ----------------------------------------------------------------------------------------------- AR -> DiT


def prior_ids(tokens_BN: jax.Array, layout: ArLayout) -> jax.Array:
    """DiT prior ids `[B, (2 th)(2 tw)]` (int32, raster) of generated tokens: `prior[y, x] = target[y//2, x//2]`
    (the pipeline's nearest x2 upsampling of the target grid; preview and final tokens are dropped)."""
    _, target = layout.split(jnp.asarray(tokens_BN))
    return upsample_grid(target)


def upsample_grid(grid_BHW: jax.Array) -> jax.Array:
    """An AR code grid `[B, h, w]` -> DiT prior ids `[B, (2h)(2w)]` (nearest x2, raster, int32); also used for
    the i2i source codes of the reference pass."""
    up = jnp.repeat(jnp.repeat(jnp.asarray(grid_BHW), 2, axis=1), 2, axis=2)
    return up.reshape(up.shape[0], -1).astype(jnp.int32)


def glyph_conditions(t5: Split, prompts: list[str], *, negative: bool = True, dtype=None
                     ) -> tuple[jax.Array, jax.Array | None]:
    """Glyph embeddings `[B, T, D]` of the prompts' quoted texts (pipeline-exact batching, `glm_jax.glyph`) and
    the CFG negative (glyph of "", `[B, 1, D]`) when `negative`."""
    from glm_jax.glyph import glyph_embeds, negative_glyph_embeds
    module = t5.merge()
    emb, _ = glyph_embeds(module, list(prompts), dtype=dtype)
    neg = negative_glyph_embeds(module, len(prompts), dtype=dtype) if negative else None
    return emb, neg


def initial_noise(root: jax.Array, ids: jax.Array, height: int, width: int) -> jax.Array:
    """x_T `[B, H/8, W/8, 16]` float32, `normal(fold_in(root, ids[b]))`. Pass sample ids for unique latents,
    group ids for a latent shared within each group (`same_latent`)."""
    return flow.initial_latents(root, ids, flow.latent_shape(height, width))


def latent_ids(sample_ids: jax.Array, group_ids: jax.Array | None, same_latent: bool) -> jax.Array:
    """The ids that key x_T: the group ids with `same_latent` (group members share x_T), else the sample ids."""
    if same_latent:
        if group_ids is None:
            raise ValueError("same_latent needs group ids")
        return jnp.asarray(group_ids, jnp.int32)
    return jnp.asarray(sample_ids, jnp.int32)


def sched_arrays(sched: FlowSchedule) -> tuple[jax.Array, jax.Array]:
    """`(timesteps, sigmas)` of a schedule as float32 device arrays (traced inputs of the jitted samplers)."""
    return jnp.asarray(sched.timesteps, jnp.float32), jnp.asarray(sched.sigmas, jnp.float32)


def as_schedule(arrays) -> FlowSchedule:
    """`FlowSchedule` from `sched_arrays` inside jit (`mu` is not needed there)."""
    return FlowSchedule(arrays[0], arrays[1], mu=0.0)


@partial(jax.jit, static_argnames=("dit_graphdef", "vae_graphdef", "guidance"))
def _ode_decode_jit(dit_graphdef, dit_state, vae_graphdef, vae_state, x_T, cond, sched, *, guidance):
    dit = cast_for_compute(nnx.merge(dit_graphdef, dit_state))
    vae = nnx.merge(vae_graphdef, vae_state)
    latents = flow.ode_sample(dit, x_T, cond, as_schedule(sched), guidance=guidance)
    return flow.decode_images(vae, latents), latents


def ode_decode(dit: Split, vae: Split, x_T: jax.Array, cond: flow.FlowCond, sched: FlowSchedule, *,
               guidance: float = 1.5) -> tuple[jax.Array, jax.Array]:
    """Euler ODE over all steps of `sched` from `x_T`, then the VAE: `(uint8 images [B, H, W, 3], latents)`.

    One jit per (shapes, guidance); the DiT and VAE states are traced arguments.
    """
    return _ode_decode_jit(dit.graphdef, dit.state, vae.graphdef, vae.state, jnp.asarray(x_T, jnp.float32), cond,
                           sched_arrays(sched), guidance=float(guidance))


def decode_tokens(stack: GlmImageStack, tokens_BN: jax.Array, layout: ArLayout, glyph_BTD: jax.Array,
                  neg_glyph_BTD: jax.Array | None, noise_root: jax.Array, sample_ids: jax.Array, *,
                  height: int, width: int, num_steps: int = 50, guidance: float = 1.5,
                  group_ids: jax.Array | None = None, same_latent: bool = False, ref_kv: Any = None
                  ) -> jax.Array:
    """Generated AR tokens -> uint8 images `[B, H, W, 3]` by the DiT's ODE sampler (CFG `guidance`) and the VAE.

    x_T is `normal(fold_in(noise_root, id))` with id = the sample id, or the group id when `same_latent` (all
    members of a group start from the same x_T: reward differences then come from the tokens alone).
    """
    prior = prior_ids(tokens_BN, layout)
    cond = flow.make_cond(glyph_BTD, prior, height, width,
                          neg_glyph_BTD=neg_glyph_BTD if guidance > 1 else None, ref_kv=ref_kv)
    x_T = initial_noise(noise_root, latent_ids(sample_ids, group_ids, same_latent), height, width)
    images, _ = ode_decode(stack.dit, stack.vae, x_T, cond, stack.schedule(num_steps, height, width),
                           guidance=guidance)
    return images


def reference_kv(dit: Split, vae: Split, source_images_uint8, source_prior_ids) -> Any:
    """i2i reference K/V of source images (one source per call; lists for several, concatenated).

    `source_images_uint8 [B_r, h, w, 3]` (already at the pipeline's VAE size, multiples of 16) are VAE-encoded
    (posterior mean, normalised latents) and run through the DiT in mode "write" with their x2-upsampled VQ
    prior ids `[B_r, (h/16)(w/16)]` (`flow.reference_kv`).
    """
    if not isinstance(source_images_uint8, (list, tuple)):
        source_images_uint8, source_prior_ids = [source_images_uint8], [source_prior_ids]
    latents, sizes = [], []
    for img in source_images_uint8:
        img = jnp.asarray(img)
        latents.append(_encode_jit(vae.graphdef, vae.state, img))
        sizes.append((img.shape[1] // 8 * 8, img.shape[2] // 8 * 8))
    return flow._ref_jit(dit.graphdef, dit.state, latents, [jnp.asarray(p, jnp.int32) for p in source_prior_ids],
                         [jnp.asarray(s, jnp.float32) for s in sizes])


@partial(jax.jit, static_argnums=0)
def _encode_jit(vae_graphdef, vae_state, images_uint8):
    vae = nnx.merge(vae_graphdef, vae_state)
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    return vae.normalize(vae.encode_mean(x.astype(vae.dtype)))
