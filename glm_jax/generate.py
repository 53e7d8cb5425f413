"""Generate images with a glm_jax GLM-Image checkpoint.

    python -m glm_jax.generate --ckpt CKPT --prompt 'a sign that says "OPEN"' --height 1024 --width 1024 --out out/
    python -m glm_jax.generate --ckpt CKPT --prompts-file prompts.txt --image src.png --height 1024 --width 768 ...
    python -m glm_jax.generate --tiny --prompt "a red circle" --height 64 --width 64 --out out/   # no weights needed

Text-to-image, or image editing with `--image` (one or more source images, the same for every prompt). Each of the
`--num-images` images of a prompt gets its own AR sample (unlike the reference pipeline's `num_images_per_prompt`,
which reuses one set of AR tokens). Writes `out/{prompt:03d}_{image:02d}.png` and `out/generation.json` (settings,
per-stage timings). Progress bars run over the AR tokens and the denoising steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from glm_jax.config import ATTENTIONS


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m glm_jax.generate", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="glm_jax checkpoint directory (written by python -m conversion.from_torch or, "
                     "from a training run, python -m glm_jax.export)")
    src.add_argument("--tiny", action="store_true", help="the embedded tiny random GLM-Image (a demo)")
    p = ap.add_mutually_exclusive_group(required=True)
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts-file", help="a text file, one prompt per non-blank line")
    ap.add_argument("--image", action="append", default=[], help="source image for editing (repeatable)")
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt, each with its own AR sample")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ap.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance (1 = off; default 1.5)")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.75)
    ap.add_argument("--top-k", type=int, default=0, help="0 = all image codes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--attention", default="", choices=ATTENTIONS,
                    help="the DiT's attention: '' (default) cuDNN flash attention on a GPU in bfloat16, else XLA's")
    ap.add_argument("--out", required=True, help="output directory")
    return ap.parse_args(argv)


def _fail(msg: str) -> int:
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


def host_callbacks_available() -> bool:
    """Whether `jax.debug.callback` can run: it needs JAX's CPU platform, which `JAX_PLATFORMS=cuda` (without
    `,cpu`) leaves out."""
    import jax
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return [args.prompt]
    if not os.path.exists(args.prompts_file):
        raise ValueError(f"--prompts-file {args.prompts_file}: file not found")
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file}: no prompts in the file")
    return prompts


def _load_sources(paths: list[str]):
    from PIL import Image
    out = []
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"--image {p}: file not found")
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"--image {p}: cannot read the image ({e})") from None
    return out


def generate(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from glm_jax import glyph
    from glm_jax.checkpoint import component_config, load_model
    from glm_jax.components import read_json
    from glm_jax.pipeline import ar_token_ids, prior_ids, resolve_attention, set_dit_attention, upsample_grid
    from glm_jax.prompts import PromptBuilder
    from glm_jax.sampling import flow
    from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams, sample_ar
    from glm_jax.sampling.schedule import flow_schedule

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.height % 32 or args.width % 32 or args.height <= 0 or args.width <= 0:
        raise ValueError(f"--height/--width {args.height}x{args.width}: both must be positive multiples of 32")
    if args.num_images < 1 or args.steps < 1:
        raise ValueError("--num-images and --steps must be >= 1")
    prompts = _read_prompts(args)
    sources = _load_sources(args.image)
    ckpt = args.ckpt
    if args.tiny:
        from glm_jax.tiny import tiny_checkpoint
        ckpt = tiny_checkpoint()
    elif not os.path.isdir(ckpt):
        raise ValueError(f"--ckpt {ckpt}: directory not found")
    for slot in ("vision_language_encoder", "transformer", "vae", "text_encoder"):
        component_config(ckpt, slot)            # a clear error if the checkpoint lacks a component
    for sub in ("processor", "scheduler"):
        if not os.path.isdir(os.path.join(ckpt, sub)):
            raise ValueError(f"--ckpt {ckpt}: no {sub}/ folder (convert the whole pipeline directory)")
    on_gpu = jax.default_backend() == "gpu"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype or ("bfloat16" if on_gpu else "float32")]

    builder = PromptBuilder.from_dir(os.path.join(ckpt, "processor"))
    builder.check_target_size(args.height, args.width)
    rows = [p for p in prompts for _ in range(args.num_images)]
    if sources:
        batch = builder.build_i2i(rows, [sources] * len(rows), args.height, args.width)
    else:
        batch = builder.build_t2i(rows, args.height, args.width)
    sched_cfg = read_json(os.path.join(ckpt, "scheduler", "scheduler_config.json"))

    ar_cfg, ar = load_model(ckpt, "vision_language_encoder", dtype=dtype)
    _, dit = load_model(ckpt, "transformer", dtype=dtype)
    dit_attention = resolve_attention(args.attention, dtype=dtype, backend=jax.default_backend())
    set_dit_attention(dit, dit_attention)
    _, vae = load_model(ckpt, "vae", dtype=dtype)
    _, t5 = load_model(ckpt, "text_encoder", dtype=jnp.float32)
    timings["load_s"] = time.perf_counter() - t0

    key = jax.random.key(args.seed)
    k_ar, k_x = jax.random.split(key)
    input_ids = jnp.asarray(batch.input_ids)
    ref_kv = None
    t1 = time.perf_counter()
    if sources:
        grids = batch.source_grids_flat
        codes = ar.image_tokens(jnp.asarray(batch.pixel_values), grids)
        from glm_jax.models.ar import scatter_image_codes
        input_ids = scatter_image_codes(input_ids, codes, ar_cfg.image_token_id)
        # reference K/V: each source's VAE latents and its x2-upsampled codes (the same for every row here)
        per_src = np.split(np.asarray(codes)[: sum(h * w for h, w in batch.source_grids[0])],
                           np.cumsum([h * w for h, w in batch.source_grids[0]])[:-1])
        refs_z, refs_ids, refs_size = [], [], []
        for img, ids, (gh, gw) in zip(batch.vae_sources[0], per_src, batch.source_grids[0], strict=True):
            z = vae.normalize(vae.encode_mean(jnp.asarray(img)[None].astype(dtype)))
            refs_z.append(z)
            refs_ids.append(upsample_grid(ids.reshape(1, gh, gw)))
            refs_size.append((z.shape[1] * 8, z.shape[2] * 8))
        ref_kv = flow.reference_kv(dit, refs_z, refs_ids, refs_size)
    timings["source_encode_s"] = time.perf_counter() - t1

    layout = ArLayout.i2i(args.height, args.width) if sources else ArLayout.t2i(args.height, args.width)
    n_codes, eos_id = ar_token_ids(ar_cfg)   # the training rollout's ids (an lm_head without an EOS row too)
    top_k = args.top_k or n_codes
    params = SamplingParams(temperature=args.temperature, top_k=top_k, top_p=args.top_p)
    callbacks = host_callbacks_available()
    if not callbacks:
        print("note: no AR token progress: JAX_PLATFORMS leaves out 'cpu', which the in-loop progress callback "
              "needs (JAX_PLATFORMS=cuda,cpu keeps it)", file=sys.stderr)
    bar = _bar(layout.n_tokens, "AR tokens", "tok")

    def progress(n, total):
        bar.n = max(bar.n, int(n))
        bar.refresh()

    t2 = time.perf_counter()
    graphdef, state = nnx.split(ar)
    roll = sample_ar(graphdef, state, input_ids, jnp.asarray(batch.attention_mask), jnp.asarray(batch.position_ids),
                     jnp.asarray(batch.decode_position_ids), k_ar, params, n_codes=n_codes,
                     eos_id=eos_id, layout=layout, progress=progress if callbacks else None,
                     progress_every=max(layout.n_tokens // 50, 1))
    jax.block_until_ready(roll.tokens)
    if not callbacks:
        bar.update(layout.n_tokens)
    bar.close()
    timings["ar_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    prior = prior_ids(roll.tokens, layout)
    emb, _ = glyph.glyph_embeds(t5, rows)
    neg = glyph.negative_glyph_embeds(t5, len(rows)) if args.guidance > 1 else None
    cond = flow.make_cond(emb.astype(dtype), prior, args.height, args.width,
                          neg_glyph_BTD=None if neg is None else neg.astype(dtype), ref_kv=ref_kv)
    sched = flow_schedule(args.steps, args.height, args.width, sched_cfg)
    x = flow.initial_latents(k_x, jnp.arange(len(rows)), flow.latent_shape(args.height, args.width))
    g_dit, s_dit = nnx.split(dit)
    sig = (jnp.asarray(sched.timesteps), jnp.asarray(sched.sigmas))

    @jax.jit
    def step(s_dit, x, k, cond, sig):
        d = nnx.merge(g_dit, s_dit)
        sch = type(sched)(sig[0], sig[1], sched.mu)
        return flow.euler_step(x, flow.velocity(d, x, k, cond, args.guidance, sch), sch, k)

    bar = _bar(args.steps, "denoising", "step")
    for k in range(args.steps):
        x = step(s_dit, x, jnp.int32(k), cond, sig)
        jax.block_until_ready(x)
        bar.update(1)
    bar.close()
    timings["dit_s"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    images = np.asarray(jax.jit(lambda v, z: flow.decode_images(v, z))(vae, x))
    timings["decode_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    from PIL import Image
    files = []
    for i, img in enumerate(images):
        name = f"{i // args.num_images:03d}_{i % args.num_images:02d}.png"
        tmp = os.path.join(args.out, name + ".tmp")
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, os.path.join(args.out, name))
        files.append(name)
    record = {"ckpt": ckpt, "prompts": prompts, "sources": args.image, "height": args.height,
              "width": args.width, "num_images": args.num_images, "steps": args.steps, "guidance": args.guidance,
              "temperature": args.temperature, "top_p": args.top_p, "top_k": top_k, "seed": args.seed,
              "dtype": jnp.dtype(dtype).name, "backend": jax.default_backend(),
              "attention": dit_attention or "xla", "files": files,
              "ar_tokens_per_image": layout.n_tokens, "timings": timings}
    tmp = os.path.join(args.out, "generation.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "generation.json"))
    return record


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        record = generate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return _fail(e)
    t = record["timings"]
    print(f"wrote {len(record['files'])} image(s) to {args.out} "
          f"(AR {t['ar_s']:.1f}s, DiT {t['dit_s']:.1f}s, decode {t['decode_s']:.1f}s, total {t['total_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
