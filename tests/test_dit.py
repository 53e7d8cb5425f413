"""Parity of `glm_jax.models.dit.GlmImageDiT` with diffusers' `GlmImageTransformer2DModel` on a tiny random model.

The torch model is NCHW, ours channels-last, so inputs / outputs are transposed here. Covered: batch 2, non-square
latents, glyph length 0 and 5, prior drop all-True and mixed, per-sample timesteps / sizes / crops, the reference
K/V cache (write at timestep 0 with no glyphs, then read; broadcast of one cached sample, two concatenated
references, one cache per sample), skip mode, the key table round trip, jit, `from_hf` and the FLOP formula.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversion.apply import load_state_dict_into, torch_state_dict
from conversion.tables.dit import RULES
from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops
from tests.tiny_torch import N_CODES, T5_D, tiny_dit
from tests.util import rel_err, torch_to_numpy_state

TOL = 1e-5
REAL_CONFIG = {"_class_name": "GlmImageTransformer2DModel", "_diffusers_version": "0.37.0.dev0",
               "attention_head_dim": 128, "condition_dim": 256, "in_channels": 16, "num_attention_heads": 32,
               "num_layers": 30, "out_channels": 16, "patch_size": 2, "prior_vq_quantizer_codebook_size": 16384,
               "text_embed_dim": 1472, "time_embed_dim": 512}


@pytest.fixture(scope="module")
def models():
    torch_model = tiny_dit(seed=3)
    cfg = DiTConfig.from_hf(dict(torch_model.config))
    model = GlmImageDiT(cfg, rngs=nnx.Rngs(0))
    load_state_dict_into(model, torch_to_numpy_state(torch_model), RULES)
    return torch_model, model


def make_inputs(seed: int, b: int, h: int, w: int, t: int, drop: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = (h // 2) * (w // 2)
    drops = {"none": np.zeros((b, n), bool), "all": np.ones((b, n), bool), "mixed": rng.random((b, n)) < 0.4}
    sizes = np.stack([rng.choice([64, 128, 192], b, replace=False), rng.choice([96, 256, 320], b, replace=False)],
                     -1)
    return {"latents": rng.standard_normal((b, 16, h, w)).astype(np.float32),
            "glyph": rng.standard_normal((b, t, T5_D)).astype(np.float32),
            "ids": rng.integers(0, N_CODES, (b, n)),
            "drop": drops[drop],
            "timestep": rng.uniform(0, 999, b).astype(np.float32).round(),
            "size": sizes.astype(np.float32),
            "crop": rng.integers(0, 48, (b, 2)).astype(np.float32)}


def run_torch(torch_model, x: dict, kv_caches=None) -> np.ndarray:
    with torch.no_grad():
        out = torch_model(hidden_states=torch.from_numpy(x["latents"]),
                          encoder_hidden_states=torch.from_numpy(x["glyph"]),
                          prior_token_id=torch.from_numpy(x["ids"]), prior_token_drop=torch.from_numpy(x["drop"]),
                          timestep=torch.from_numpy(x["timestep"]), target_size=torch.from_numpy(x["size"]),
                          crop_coords=torch.from_numpy(x["crop"]), kv_caches=kv_caches, return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 1)


@partial(nnx.jit, static_argnames=("kv_mode",))
def _forward(model, *args, kv_mode: str = "none", ref_kv=None):
    return model(*args, kv_mode=kv_mode, ref_kv=ref_kv)


def run_jax(model, x: dict, **kw):
    """Our forward on the test inputs, jitted (compiling a tiny model is faster than first-call eager dispatch)."""
    return _forward(model, jnp.asarray(x["latents"].transpose(0, 2, 3, 1)), jnp.asarray(x["glyph"]), jnp.asarray(x["ids"]),
                 jnp.asarray(x["drop"]), jnp.asarray(x["timestep"]), jnp.asarray(x["size"]), jnp.asarray(x["crop"]),
                 **kw)


def reference_inputs(seed: int, h: int, w: int) -> dict[str, np.ndarray]:
    """One reference image as the pipeline's write pass sees it: glyph length 0, timestep 0, drop False."""
    x = make_inputs(seed, 1, h, w, 0, "none")
    x.update(timestep=np.zeros(1, np.float32), size=np.array([[h * 8, w * 8]], np.float32),
             crop=np.zeros((1, 2), np.float32))
    return x


def write_reference(torch_model, model, ref: dict):
    """The reference K/V of `ref` written by both models: diffusers' cache (left in write mode, advanced to the
    next sample) and ours (a list over layers)."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    cache = GlmImageKVCache(num_layers=torch_model.config.num_layers)
    cache.set_mode("write")
    run_torch(torch_model, ref, cache)
    cache.next_sample()
    return cache, run_jax(model, ref, kv_mode="write")[1]


@pytest.mark.parametrize("t,drop", [(5, "mixed"), (0, "all"), (3, "none")])
def test_forward_matches_diffusers(models, t, drop):
    torch_model, model = models
    x = make_inputs(10 + t, 2, 16, 24, t, drop)
    out, kv = run_jax(model, x)
    want = run_torch(torch_model, x)
    assert out.shape == (2, 16, 24, 16) and kv is None
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_prior_drop_changes_output(models):
    """Guards the drop mask against being a no-op on the test data (all-dropped differs from none-dropped)."""
    _, model = models
    x = make_inputs(1, 2, 8, 12, 2, "none")
    a, _ = run_jax(model, x)
    b, _ = run_jax(model, dict(x, drop=np.ones_like(x["drop"])))
    assert rel_err(a, b) > 1e-3  # 100x the parity tolerance


def test_reference_kv_write_then_read(models):
    """One reference (non-square, different size from the target) written once, broadcast over batch 2."""
    torch_model, model = models
    ref = reference_inputs(20, 12, 8)
    cache, kv = write_reference(torch_model, model, ref)
    assert len(kv) == torch_model.config.num_layers
    for i, (k, v) in enumerate(kv):
        assert k.shape == (1, 24, 2, 16)
        assert rel_err(k, cache[i].k_caches[0].numpy()) < TOL
        assert rel_err(v, cache[i].v_caches[0].numpy()) < TOL

    x = make_inputs(21, 2, 16, 24, 5, "none")
    cache.set_mode("read")
    want = run_torch(torch_model, x, cache)
    out, _ = run_jax(model, x, kv_mode="read", ref_kv=kv)
    assert rel_err(out, want) < TOL, rel_err(out, want)
    plain = run_torch(torch_model, x)
    assert rel_err(want, plain) > 1e-3  # the reference really changes the prediction

    cache.set_mode("skip")
    want_skip = run_torch(torch_model, dict(x, drop=np.ones_like(x["drop"])), cache)
    out_skip, _ = run_jax(model, dict(x, drop=np.ones_like(x["drop"])), kv_mode="skip", ref_kv=kv)
    assert rel_err(out_skip, want_skip) < TOL
    out_none, _ = run_jax(model, dict(x, drop=np.ones_like(x["drop"])))
    np.testing.assert_array_equal(np.asarray(out_skip), np.asarray(out_none))


def test_two_references_concatenated(models):
    torch_model, model = models
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    refs = [reference_inputs(30, 8, 8), reference_inputs(31, 12, 16)]
    cache = GlmImageKVCache(num_layers=torch_model.config.num_layers)
    cache.set_mode("write")
    kvs = []
    for r in refs:
        run_torch(torch_model, r, cache)
        kvs.append(run_jax(model, r, kv_mode="write")[1])
    cache.next_sample()
    kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), kvs[0], kvs[1])
    assert kv[0][0].shape[1] == 16 + 48

    x = make_inputs(32, 2, 8, 12, 4, "mixed")
    cache.set_mode("read")
    want = run_torch(torch_model, x, cache)
    out, _ = run_jax(model, x, kv_mode="read", ref_kv=kv)
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_per_sample_references(models):
    """A batch-2 write pass (one reference per sample) equals torch's two write passes with `next_sample`."""
    torch_model, model = models
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    refs = [reference_inputs(40, 8, 12), reference_inputs(41, 8, 12)]
    cache = GlmImageKVCache(num_layers=torch_model.config.num_layers)
    cache.set_mode("write")
    for r in refs:
        run_torch(torch_model, r, cache)
        cache.next_sample()
    both = {k: np.concatenate([refs[0][k], refs[1][k]]) for k in refs[0]}
    _, kv = run_jax(model, both, kv_mode="write")

    x = make_inputs(42, 2, 8, 8, 2, "none")
    cache.set_mode("read")
    want = run_torch(torch_model, x, cache)
    out, _ = run_jax(model, x, kv_mode="read", ref_kv=kv)
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_jit_forward_with_reference(models):
    torch_model, model = models
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    ref = reference_inputs(50, 8, 8)
    cache = GlmImageKVCache(num_layers=torch_model.config.num_layers)
    cache.set_mode("write")
    run_torch(torch_model, ref, cache)
    cache.next_sample()
    cache.set_mode("read")
    x = make_inputs(51, 2, 8, 12, 3, "mixed")
    want = run_torch(torch_model, x, cache)

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ref_args, args):
        m = nnx.merge(graphdef, state)
        _, kv = m(*ref_args, kv_mode="write")
        return m(*args, kv_mode="read", ref_kv=kv)[0]

    def as_args(d):
        return (d["latents"].transpose(0, 2, 3, 1), d["glyph"], d["ids"], d["drop"], d["timestep"], d["size"],
                d["crop"])

    out = fwd(state, as_args(ref), as_args(x))
    assert rel_err(out, want) < TOL, rel_err(out, want)


def test_bf16_close_to_fp32_reference(models):
    """bf16 compute stays within bf16 accuracy of the fp32 torch output."""
    torch_model, model = models
    bf = GlmImageDiT(model.cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    load_state_dict_into(bf, torch_to_numpy_state(torch_model), RULES)
    x = make_inputs(60, 2, 8, 12, 3, "mixed")
    out, _ = run_jax(bf, x)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), run_torch(torch_model, x)) < 5e-2


def test_bad_kv_arguments_raise(models):
    _, model = models
    x = make_inputs(70, 1, 4, 4, 1, "none")
    with pytest.raises(ValueError, match="kv_mode"):
        run_jax(model, x, kv_mode="append")
    with pytest.raises(ValueError, match="ref_kv"):
        run_jax(model, x, kv_mode="read", ref_kv=None)


def test_key_table_round_trip(models):
    torch_model, model = models
    sd = torch_to_numpy_state(torch_model)
    back = torch_state_dict(model, RULES)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_from_hf_reads_every_size():
    cfg = DiTConfig.from_hf(REAL_CONFIG)
    assert (cfg.inner_dim, cfg.num_layers, cfg.attention_head_dim, cfg.text_embed_dim) == (4096, 30, 128, 1472)
    # absent keys take the diffusers class defaults (40 x 64 heads), not the checkpoint's
    d = DiTConfig.from_hf({"num_layers": 3})
    assert (d.num_layers, d.attention_head_dim, d.num_attention_heads, d.condition_dim) == (3, 40, 64, 256)
    with pytest.raises(ValueError, match="attention_head_dim"):
        DiTConfig.from_hf({"attention_head_dim": 42})


def test_flops_match_brief():
    cfg = DiTConfig.from_hf(REAL_CONFIG)
    assert abs(dit_flops(cfg, 4096, 1, 0) / 1e12 - 58.0) < 0.05
    assert abs(dit_flops(cfg, 4096, 512, 0) / 1e12 - 66.4) < 0.05
    assert abs(dit_flops(cfg, 4096, 1, 4096) / 1e12 - 66.3) < 0.05
    assert abs(dit_flops(cfg, 16384, 1, 0) / 1e12 - 331) < 0.5


def test_flops_count_matches_parameter_matmuls(models):
    """The per-token weight term equals 2 x (block linear parameters) of the tiny model."""
    _, model = models
    cfg = model.cfg
    blk = model.transformer_blocks[0]
    w = sum(int(np.prod(m.kernel[...].shape)) for m in (blk.attn1.to_q, blk.attn1.to_k, blk.attn1.to_v,
                                                        blk.attn1.to_out, blk.ff.proj_in, blk.ff.proj_out))
    n = 7
    base = dit_flops(cfg, n, 0, 0)
    more = dit_flops(cfg, n + 1, 0, 0)
    attn = 4 * ((n + 1) ** 2 - n ** 2) * cfg.inner_dim
    proj = 2 * (cfg.in_channels * 4 * cfg.inner_dim + 2 * cfg.inner_dim ** 2 + cfg.inner_dim * cfg.out_channels * 4)
    assert more - base == cfg.num_layers * (2 * w + attn) + proj


@pytest.mark.parametrize("policy", ["full", "dots", "dots_attention"])
@pytest.mark.parametrize("lora", [False, True])
def test_block_remat_keeps_loss_and_gradients(models, policy, lora):
    """Rematerialised DiT blocks (training memory) give the same loss and gradients: of every parameter for
    full fine-tuning, of the adapters alone (frozen base kernels) under LoRA."""
    from glm_jax.lora import LoraConfig, add_lora, lora_trainable
    _, base = models
    graphdef, state = nnx.split(base)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    trainable = nnx.Param
    if lora:
        add_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(2))
        for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, lora_trainable))):
            if path[-1] == "lora_b":                      # non-zero B, so that both factors get gradients
                var.set_value(jax.random.normal(jax.random.key(10 + i), var.get_value().shape) * 0.1)
        trainable = lora_trainable
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    x = make_inputs(5, 2, 8, 6, 3, "mixed")
    args = (jnp.asarray(x["latents"].transpose(0, 2, 3, 1)), jnp.asarray(x["glyph"]), jnp.asarray(x["ids"]),
            jnp.asarray(x["drop"]), jnp.asarray(x["timestep"]), jnp.asarray(x["size"]), jnp.asarray(x["crop"]))

    def loss(params, frozen, remat):
        m = nnx.merge(graphdef, params, frozen)
        m.remat = remat
        out, _ = m(*args)
        return jnp.mean(jnp.sin(out))

    ref_l, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, frozen, "none")
    l, g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, frozen, policy)
    assert abs(float(l) - float(ref_l)) <= 1e-5 * abs(float(ref_l))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref_g)) > 0


def gradients_vs_torch(torch_model, model, x: dict, cot: np.ndarray, *, check_jaxpr=None):
    """Gradients of `<out, cotangent>` w.r.t. every parameter and the latents: torch autograd's
    (`{torch key: grad}`, latents NCHW) and ours (`{our path: grad}`, latents NHWC). `check_jaxpr(jaxpr_text)`
    may inspect our traced gradient first."""
    torch_model.zero_grad(set_to_none=True)
    lat = torch.from_numpy(x["latents"]).requires_grad_(True)
    out = torch_model(hidden_states=lat, encoder_hidden_states=torch.from_numpy(x["glyph"]),
                      prior_token_id=torch.from_numpy(x["ids"]), prior_token_drop=torch.from_numpy(x["drop"]),
                      timestep=torch.from_numpy(x["timestep"]), target_size=torch.from_numpy(x["size"]),
                      crop_coords=torch.from_numpy(x["crop"]), return_dict=False)[0]
    (out * torch.from_numpy(cot.transpose(0, 3, 1, 2))).sum().backward()
    want = {k: p.grad.numpy() for k, p in torch_model.named_parameters() if p.grad is not None}

    graphdef, params = nnx.split(model, nnx.Param)
    args = (jnp.asarray(x["glyph"]), jnp.asarray(x["ids"]), jnp.asarray(x["drop"]), jnp.asarray(x["timestep"]),
            jnp.asarray(x["size"]), jnp.asarray(x["crop"]))

    def f(params, latents):
        return jnp.vdot(nnx.merge(graphdef, params)(latents, *args)[0], jnp.asarray(cot))
    j_lat = jnp.asarray(x["latents"].transpose(0, 2, 3, 1))
    if check_jaxpr is not None:
        check_jaxpr(str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(params, j_lat)))
    g_params, g_lat = jax.jit(jax.grad(f, argnums=(0, 1)))(params, j_lat)
    got = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_params)}
    return want, lat.grad.numpy().transpose(0, 2, 3, 1), got, np.asarray(g_lat)


@pytest.mark.parametrize("t", [5, 0])
def test_gradients_match_diffusers(models, t):
    """The backward pass (the training signal) equals torch autograd's: gradients of `<out, cotangent>` with
    respect to every parameter and to the latents, fp32. Covers the hand-written backward passes of the FF GELU
    and the qk LayerNorm + RoPE, the per-stream modulation of the joint text + image stream and its reduction."""
    from conversion.table import find_torch
    torch_model, model = models
    x = make_inputs(40 + t, 2, 8, 12, t, "mixed")
    cot = np.random.default_rng(1).standard_normal((2, 8, 12, 16)).astype(np.float32)
    want, want_lat, got, g_lat = gradients_vs_torch(torch_model, model, x, cot)
    assert rel_err(g_lat, want_lat) < TOL
    checked = 0
    for key, g in want.items():
        path, rule = find_torch(RULES, key)
        ours = got[path].T if rule.transform == "linear" else got[path]
        if t == 0 and key.startswith("glyph_projector"):
            continue                                   # no glyph tokens: torch leaves these at zero, as we do
        assert rel_err(ours, g) < 1e-4, (key, rel_err(ours, g))
        checked += 1
    assert checked >= 10 * torch_model.config.num_layers


def test_kernels_with_padded_stream_match_diffusers(monkeypatch):
    """The whole model with the fused ops' kernels (in Pallas' interpreter) on a stream whose length they do not
    tile (5 glyph + 24 image tokens = 29): the stream is padded to 32 rows, masked out of the attention's keys
    and dropped, and the output, every parameter gradient and the reference K/V written and read all equal
    diffusers'."""
    from conversion.table import find_torch
    from glm_jax.models import dit_ops
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    torch_model = tiny_dit(seed=5, head_dim=128)
    cfg = DiTConfig.from_hf(dict(torch_model.config))
    model = GlmImageDiT(cfg, rngs=nnx.Rngs(0))
    load_state_dict_into(model, torch_to_numpy_state(torch_model), RULES)
    assert dit_ops.kernel_length(29, cfg.inner_dim) == 32 and dit_ops.kernel_length(32, cfg.inner_dim) == 32

    x = make_inputs(50, 2, 8, 12, 5, "mixed")
    cot = np.random.default_rng(2).standard_normal((2, 8, 12, 16)).astype(np.float32)
    jaxprs = []
    want, want_lat, got, g_lat = gradients_vs_torch(torch_model, model, x, cot, check_jaxpr=jaxprs.append)
    assert "pallas_call" in jaxprs[0]
    assert rel_err(g_lat, want_lat) < TOL
    for key, g in want.items():
        path, rule = find_torch(RULES, key)
        ours = got[path].T if rule.transform == "linear" else got[path]
        assert rel_err(ours, g) < TOL, (key, rel_err(ours, g))

    # the reference K/V: written with glyph length 0 (24 image tokens, a multiple of 8) and read by a padded stream
    cache, kv = write_reference(torch_model, model, reference_inputs(51, 12, 8))
    xr = make_inputs(52, 2, 8, 12, 5, "none")
    _, kv_padded = run_jax(model, dict(xr, drop=np.ones_like(xr["drop"])), kv_mode="write")
    assert kv_padded[0][0].shape == (2, 24, 2, 128)          # image tokens only, no padding rows
    cache.set_mode("read")
    out_read, _ = run_jax(model, xr, kv_mode="read", ref_kv=kv)
    assert rel_err(out_read, run_torch(torch_model, xr, cache)) < TOL


def test_padded_length_rule(models, monkeypatch):
    """The stream is padded only where needed: to a multiple of 8 for the fused ops' kernels (where they tile
    the width) or for cuDNN attention (odd lengths fail in its backward pass), never otherwise."""
    _, model = models                                     # width 32: the kernels do not tile it
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    assert model.padded_length(29) == 29
    before = [block.attn1.implementation for block in model.transformer_blocks]
    for block in model.transformer_blocks:
        block.attn1.implementation = "cudnn"
    try:
        assert model.padded_length(29) == 32 and model.padded_length(32) == 32
    finally:
        for block, impl in zip(model.transformer_blocks, before):
            block.attn1.implementation = impl
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "0")
    wide = GlmImageDiT(DiTConfig.from_hf(dict(tiny_dit(seed=1, head_dim=128).config)), rngs=nnx.Rngs(0))
    assert wide.padded_length(29) == 29                   # kernels off: no padding
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    assert wide.padded_length(29) == 32 and wide.padded_length(4096 + 256) == 4096 + 256
