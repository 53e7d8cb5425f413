"""Which attention runs where. `model.attention` ("" automatic, "xla", "cudnn"; `pipeline.resolve_attention`)
sets the DiT's attention and the AR's teacher-forced (training) pass (`pipeline.set_ar_train_attention`); the AR
rollouts' prefill and one-token steps keep their own path.

With XLA's attention the update materialises float32 scores `[B, heads, L, L]` per layer (≈230 MB per 1024²
sequence and layer of the AR at real size); cuDNN's flash attention does not (`benchmarks/RESULTS.md`). Without a
GPU the cuDNN checks are bypassed for tracing only (`tests.test_remat.cudnn_tracing`); the GPU tests run the
cuDNN paths (`JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.models.remat import FUSED_ATTENTION_PRIMITIVES
from glm_jax.pipeline import (
    GlmImageStack,
    resolve_attention,
    set_ar_train_attention,
)
from glm_jax.tiny import tiny_ar_config, tiny_dit_config
from tests.test_remat import cudnn_tracing

B, L = 2, 16


def tiny_ar(param_dtype=jnp.bfloat16) -> GlmImageAR:
    return GlmImageAR(ArConfig.from_hf(tiny_ar_config()), dtype=jnp.bfloat16, param_dtype=param_dtype,
                      rngs=nnx.Rngs(0))


def inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 100, (B, L)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (3, B, L))
    mask = jnp.ones((B, L), bool).at[1, :3].set(False)          # the second row left-padded
    return ids, pos, mask


def uses_fused_attention(fn) -> bool:
    with cudnn_tracing():
        text = str(jax.make_jaxpr(fn)())
    return any(p in text for p in FUSED_ATTENTION_PRIMITIVES)


def test_train_attention_reaches_the_teacher_forced_pass_only():
    model = tiny_ar()
    ids, pos, mask = inputs()
    assert not uses_fused_attention(lambda: model.hidden_states(ids, pos, mask))
    set_ar_train_attention(model, "cudnn")
    assert uses_fused_attention(lambda: model.hidden_states(ids, pos, mask))
    cache = model.init_cache(B, 2 * L)
    assert not uses_fused_attention(lambda: model.prefill(ids, pos, mask, cache))


def test_load_applies_the_attention_to_the_dit_and_the_ar_update():
    from glm_jax.tiny import tiny_checkpoint
    stack = GlmImageStack.load(tiny_checkpoint(seed=0), components=("ar", "dit"), attention="cudnn")
    ar, dit = stack.ar.merge(), stack.dit.merge()
    assert [layer.self_attn.train_implementation for layer in ar.text.layers] == ["cudnn"] * len(ar.text.layers)
    assert all(layer.self_attn.implementation is None for layer in ar.text.layers)     # rollouts unchanged
    assert all(block.attn1.implementation == "cudnn" for block in dit.transformer_blocks)
    plain = GlmImageStack.load(tiny_checkpoint(seed=0), components=("ar",)).ar.merge()
    assert all(layer.self_attn.train_implementation is None for layer in plain.text.layers)


@pytest.mark.parametrize("backend,dtype,tensor,want", [
    ("gpu", jnp.bfloat16, 1, "cudnn"),
    ("gpu", jnp.float16, 1, "cudnn"),
    ("gpu", jnp.bfloat16, 2, None),         # heads split over `tensor`: XLA's attention unless asked
    ("gpu", jnp.float32, 1, None),          # cuDNN's kernels take half precision only
    ("cpu", jnp.bfloat16, 1, None),
    ("tpu", jnp.bfloat16, 1, None),
])
def test_automatic_attention(backend, dtype, tensor, want):
    assert resolve_attention("", dtype=dtype, backend=backend, tensor=tensor) == want


def test_named_attention_applies_everywhere():
    for setting in ("xla", "cudnn"):
        for backend, tensor in (("gpu", 1), ("gpu", 4), ("cpu", 1)):
            assert resolve_attention(setting, dtype=jnp.float32, backend=backend, tensor=tensor) == setting
    with pytest.raises(ValueError, match="model.attention='flash'"):
        resolve_attention("flash", dtype=jnp.bfloat16, backend="gpu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_update_pass_matches_xla():
    """On a GPU, the loss and parameter gradients of the teacher-forced pass (bf16, a left-padded row) with cuDNN
    attention match XLA's attention to bf16 rounding."""
    model = tiny_ar(param_dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    ids, pos, mask = inputs()

    def loss(p, impl):
        m = nnx.merge(graphdef, p)
        set_ar_train_attention(m, impl)
        h = m.hidden_states(ids, pos, mask).astype(jnp.float32)
        return jnp.mean(jnp.sin(h) * mask[..., None])

    (l_ref, g_ref), (l_got, g_got) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, impl)
                                      for impl in ("xla", "cudnn"))
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=2e-2)
    ref = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(g_ref)])
    got = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(g_got)])
    assert np.linalg.norm(got - ref) <= 2e-2 * np.linalg.norm(ref)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_dit_attention_matches_xla():
    """On a GPU in bf16, the DiT's joint attention with cuDNN gives XLA's outputs to bf16 rounding in the modes
    the pipeline uses: writing the image tokens' K/V, and reading a reference's (I2I: more keys than queries),
    on a stream of odd length padded to a multiple of 8 with the padding masked out of the keys."""
    from glm_jax.models.dit import DiTConfig, GlmImageDiT, rope_2d
    cfg = DiTConfig.from_hf(tiny_dit_config())
    attn = GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)).transformer_blocks[0].attn1
    rng = np.random.default_rng(0)
    t, hp, wp, length = 5, 8, 12, 104                  # 5 text + 96 image tokens = 101, padded to 104
    n_valid = t + hp * wp
    cos, sin = rope_2d(hp, wp, cfg.attention_head_dim)
    cos = jnp.concatenate([jnp.ones((t, cos.shape[1])), cos, jnp.ones((length - n_valid, cos.shape[1]))])
    sin = jnp.concatenate([jnp.zeros((t, sin.shape[1])), sin, jnp.zeros((length - n_valid, sin.shape[1]))])
    s = jnp.asarray(rng.standard_normal((2, length, cfg.inner_dim)), jnp.bfloat16).at[:, n_valid:].set(0)
    ref_kv = tuple(jnp.asarray(rng.standard_normal((1, 24, cfg.num_attention_heads, cfg.attention_head_dim)),
                               jnp.bfloat16) for _ in range(2))

    def run(impl):
        attn.implementation = impl
        fwd = nnx.jit(lambda a, mode, kv: a(s, t, cos, sin, mode, kv, n_valid=n_valid), static_argnums=1)
        own, stored = fwd(attn, "write", None)
        read, _ = fwd(attn, "read", ref_kv)
        return [np.asarray(x, np.float32) for x in (own[:, :n_valid], read[:, :n_valid], *stored)]

    want, got = run("xla"), run("cudnn")
    assert np.linalg.norm(want[1] - want[0]) > 0.1 * np.linalg.norm(want[0])      # the reference K/V matter
    for a, r in zip(got, want, strict=True):
        assert np.linalg.norm(a - r) <= 2e-2 * np.linalg.norm(r), np.linalg.norm(a - r) / np.linalg.norm(r)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU")
def test_default_attention_on_a_gpu_trains_and_generates(tmp_path, capsys):
    """On a GPU in bf16 the default `model.attention=''` runs cuDNN in the DiT and the AR update through a whole
    I2I run of both components (rollouts, reference K/V, updates, eval), and `generate` uses it in the DiT."""
    import json

    from glm_jax import generate, train
    from glm_jax.tiny import tiny_checkpoint
    from tests.test_train import FAST
    work = tmp_path / "run"
    assert train.main(["--config", "configs/i2i.py:tiny,both", "--workdir", str(work), *FAST,
                       "--config.model.dtype=bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "attention: cuDNN flash attention in the DiT and the AR update (model.attention='')" in err
    assert "step 2/2" in err
    out = tmp_path / "gen"
    assert generate.main(["--ckpt", tiny_checkpoint(str(tmp_path / "ckpt")), "--prompt", "a red circle",
                          "--height", "64", "--width", "64", "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["attention"] == "cudnn" and record["dtype"] == "bfloat16"
