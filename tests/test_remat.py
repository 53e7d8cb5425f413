"""Rematerialisation policies (`glm_jax.models.remat`): what each keeps for the backward pass of a DiT block.

The float32 gradients under the policies are compared with no remat in `tests/test_dit.py` (every policy but
`dots_all`) and `tests/test_ar.py` (`full`, `dots`); here the saved residuals themselves are read from the traced
gradient (`jax.ad_checkpoint.print_saved_residuals`), on the path the real model trains with: bf16, cuDNN
attention. Without a GPU the cuDNN availability checks are bypassed
for tracing only (nothing is compiled or run), so the check that `dots_attention` recognises the attention
primitive of the installed JAX runs in CI.
"""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from glm_jax.models.dit import DiTConfig, GlmImageDiT
from glm_jax.models.remat import FUSED_ATTENTION_PRIMITIVES, REMAT_POLICIES
from glm_jax.tiny import tiny_dit_config


@contextlib.contextmanager
def cudnn_tracing():
    """Lets `jax.nn.dot_product_attention(implementation="cudnn")` be traced on a machine without cuDNN."""
    if jax.default_backend() == "gpu":
        yield
        return
    import jax._src.cudnn.fused_attention_stablehlo as fa
    with mock.patch.object(fa, "check_cudnn_version", lambda *a, **k: 91000), \
            mock.patch.object(fa, "check_compute_capability", lambda *a, **k: True):
        yield


def saved_residuals(policy: str, capsys) -> list[str]:
    """The residuals the gradient of the tiny (2-layer) DiT in bf16 with cuDNN attention keeps under `policy`, one
    line each as `print_saved_residuals` prints them (type, then what produced it and where)."""
    cfg = DiTConfig.from_hf(tiny_dit_config())
    model = GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention="cudnn", remat=policy,
                        rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    b, h, w, t = 1, 8, 8, 8
    n = (h // 2) * (w // 2)
    args = (jnp.zeros((b, h, w, 16), jnp.bfloat16), jnp.zeros((b, t, cfg.text_embed_dim), jnp.bfloat16),
            jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool), jnp.ones((b,), jnp.float32),
            jnp.full((b, 2), 64.0, jnp.float32), jnp.zeros((b, 2), jnp.float32))

    def loss(p):
        out, _ = nnx.merge(graphdef, p)(*args)
        return jnp.sum(out.astype(jnp.float32))

    capsys.readouterr()
    with cudnn_tracing():
        print_saved_residuals(loss, params)
    return capsys.readouterr().out.splitlines()


def attention_outputs(lines: list[str]) -> list[str]:
    names = "|".join(re.escape(p) for p in FUSED_ATTENTION_PRIMITIVES)
    return [ln for ln in lines if re.search(rf"output of ({names})\b", ln)]


def test_dots_attention_keeps_the_fused_attention_outputs(capsys):
    """`dots_attention` keeps, per layer, the cuDNN forward's two outputs (the bf16 attention output and its
    float32 softmax statistics); `dots` keeps neither (its backward pass runs the attention forward again), `none`
    keeps them as plain residuals. Fails if JAX renames the primitive the policy looks for."""
    layers = DiTConfig.from_hf(tiny_dit_config()).num_layers
    with_attention, dots = saved_residuals("dots_attention", capsys), saved_residuals("dots", capsys)
    kept = attention_outputs(with_attention)
    assert len(kept) == 2 * layers, kept
    assert sum(ln.startswith("bf16[") for ln in kept) == layers
    assert sum(ln.startswith("f32[") for ln in kept) == layers
    assert attention_outputs(dots) == []
    assert len(attention_outputs(saved_residuals("none", capsys))) == 2 * layers
    # the policy adds to `dots`: every residual `dots` keeps is kept too
    assert all(ln in with_attention for ln in dots if "output of" in ln)


def test_policies_are_named_in_the_config():
    pytest.importorskip("ml_collections")
    from glm_jax.config import REMATS
    assert set(REMATS) == set(REMAT_POLICIES)


@pytest.mark.parametrize("policy", ["dots", "dots_attention"])
def test_policy_decides_on_primitives(policy):
    """Unbatched matmul outputs are saveable under both; a batched one (attention scores in XLA's attention) and
    an elementwise op under neither."""
    fn = REMAT_POLICIES[policy]
    x = jnp.ones((4, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda a, q: (a @ a.T, jnp.einsum("bqd,bkd->bqk", q, q), jnp.sin(a)))(
        x, jnp.ones((2, 4, 8)))
    verdict = [(e.primitive.name, bool(fn(e.primitive, *[v.aval for v in e.invars], **e.params)))
               for e in jaxpr.eqns if e.primitive.name in ("dot_general", "sin")]
    assert verdict == [("dot_general", True), ("dot_general", False), ("sin", False)], verdict


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU")
@pytest.mark.parametrize("policy", ["dots", "dots_attention"])
def test_cudnn_remat_gradients_match_no_remat(policy):
    """On a GPU, in bf16 with cuDNN attention and the Pallas ops (the real training path), the parameter
    gradients of a tiny DiT under the policy match those without remat to bf16 rounding."""
    cfg = DiTConfig.from_hf(tiny_dit_config())
    model = GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="cudnn", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    b, h, w, t = 2, 16, 16, 8
    n = (h // 2) * (w // 2)
    args = (jnp.asarray(rng.standard_normal((b, h, w, 16)), jnp.bfloat16),
            jnp.asarray(rng.standard_normal((b, t, cfg.text_embed_dim)), jnp.bfloat16),
            jnp.asarray(rng.integers(0, cfg.prior_vq_quantizer_codebook_size, (b, n)), jnp.int32),
            jnp.zeros((b, n), bool), jnp.asarray([10.0, 700.0], jnp.float32), jnp.full((b, 2), 128.0, jnp.float32),
            jnp.zeros((b, 2), jnp.float32))

    def loss(p, remat):
        m = nnx.merge(graphdef, p)
        m.remat = remat
        out, _ = m(*args)
        return jnp.mean(jnp.sin(out.astype(jnp.float32)))

    ref = jax.jit(jax.grad(loss), static_argnums=1)(params, "none")
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, policy)
    ref = [np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(ref)]
    got = [np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(got)]
    # the recomputed forward is compiled apart from the kept one, so bf16 roundings differ: relative L2 errors,
    # per parameter and over all of them (a wrong or stale residual gives errors of order one)
    for a, r in zip(got, ref, strict=True):
        assert np.linalg.norm(a - r) <= 5e-2 * np.linalg.norm(r) + 1e-7
    a, r = np.concatenate(got), np.concatenate(ref)
    assert np.linalg.norm(a - r) <= 1e-2 * np.linalg.norm(r) and np.linalg.norm(r) > 0
