"""GlmImageAR (Flax) against transformers `GlmImageForConditionalGeneration` on the tiny random model (fp32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversion.apply import load_state_dict_into, torch_state_dict
from conversion.tables.ar import RULES, TEXT_RULES
from glm_jax.models import positions as P
from glm_jax.models.ar import ArConfig, ArTextConfig, GlmImageAR, scatter_image_codes
from tests.test_positions import IMAGE, i2i_prompt, left_pad, t2i_prompt
from tests.tiny_torch import N_CODES, ar_config_dict, tiny_ar
from tests.util import rel_err, torch_to_numpy_state

SOURCES = [(2, 3), (3, 4)]  # two source images, different non-square grids
TOL = 1e-5


@pytest.fixture(scope="module")
def hf():
    return tiny_ar(3)


@pytest.fixture(scope="module")
def cfg() -> ArConfig:
    return ArConfig.from_hf(ar_config_dict())


@pytest.fixture(scope="module")
def full(hf, cfg):
    """The whole AR (text + ViT + VQ) loaded through the key table."""
    return load_state_dict_into(GlmImageAR(cfg, rngs=nnx.Rngs(0)), torch_to_numpy_state(hf), RULES)


@pytest.fixture(scope="module")
def text_only(hf, cfg):
    """The t2i-only AR (no ViT / VQ), loaded from the same torch state dict ignoring the vision keys."""
    model = GlmImageAR(cfg, rngs=nnx.Rngs(1), with_vision=False)
    return load_state_dict_into(model, torch_to_numpy_state(hf), TEXT_RULES,
                                ignore=lambda k: k.startswith(("model.visual.", "model.vqmodel.")))


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(7)
    return torch.randn(sum(h * w for h, w in SOURCES), 3 * 16 * 16, generator=g)


@pytest.fixture(scope="module")
def hf_codes(hf, pixels):
    """transformers' VQ codes of the source images, raster order per image."""
    thw = torch.tensor([[1, h, w] for h, w in SOURCES])
    with torch.no_grad():
        feats = hf.model.get_image_features(pixels, thw).pooler_output
        return hf.model.get_image_tokens(feats).numpy()


def hf_logits(hf, ids, mask, grids, pixel_values=None):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pixel_values,
                 image_grid_thw=torch.tensor([g for gs in grids for g in gs]),
                 images_per_sample=torch.tensor([len(gs) for gs in grids]))
    return out.logits.numpy()


def positions(cfg, ids, mask, grids):
    pos, start = P.prompt_position_ids(ids, mask, grids, cfg)
    gen = P.generation_grids(ids, mask, grids, cfg)
    return pos, P.decode_position_ids(start, gen)


def test_config_from_hf(cfg):
    t = cfg.text
    assert (t.vocab_size, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (400, 128, 2, 4,
                                                                                                    2, 32)
    assert (t.rotary_dim, t.mrope_section, t.vision_vocab_size) == (16, (2, 3, 3), N_CODES)
    assert (cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id) == (IMAGE, 128, 129)
    bad = dict(ar_config_dict()["text_config"])
    bad["rope_parameters"] = dict(bad["rope_parameters"], mrope_section=[2, 2, 3])
    with pytest.raises(ValueError, match="mrope_section"):
        ArTextConfig.from_hf(bad)


def test_key_table_round_trip(hf, full):
    sd = torch_to_numpy_state(hf)
    back = torch_state_dict(full, RULES)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_t2i_logits_match_hf_left_padded(hf, cfg, text_only):
    (a, ga), (b, gb) = t2i_prompt("a red fox in snow", (3, 5), (2, 3)), t2i_prompt("cat", (4, 2), (3, 2))
    ids, mask = left_pad([a, b])
    ref = hf_logits(hf, ids, mask, [ga, gb])
    pos, _ = positions(cfg, ids, mask, [ga, gb])
    got = np.asarray(text_only.forward(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
    valid = mask == 1
    assert rel_err(got[valid], ref[valid]) < TOL


@pytest.mark.parametrize("kernels", ["0", "interpret"])
def test_t2i_parameter_gradients_match_hf(hf, cfg, text_only, kernels, monkeypatch):
    """Every text-decoder parameter's gradient (the trainer's: `jax.grad` through the model as GRPO runs it)
    equals torch autograd's, for a random cotangent on the valid positions of a left-padded batch; with the
    MLP's gated activation differentiated by JAX and with its fused backward kernel (`ar_ops`, interpreted)."""
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", kernels)
    (a, ga), (b, gb) = t2i_prompt("a red fox in snow", (3, 5), (2, 3)), t2i_prompt("cat", (4, 2), (3, 2))
    ids, mask = left_pad([a, b])
    pos, _ = positions(cfg, ids, mask, [ga, gb])
    cot = np.random.default_rng(3).standard_normal((*ids.shape, cfg.text.vision_vocab_size)).astype(np.float32)
    cot *= (mask == 1)[..., None]
    params = [p for _, p in hf.named_parameters()]
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             image_grid_thw=torch.tensor([g for gs in (ga, gb) for g in gs]), images_per_sample=torch.tensor([2, 2]))
    grads = torch.autograd.grad((out.logits * torch.from_numpy(cot)).sum(), params, allow_unused=True)
    ref = {n: g.numpy() for (n, _), g in zip(hf.named_parameters(), grads, strict=True) if g is not None}

    graphdef, state = nnx.split(text_only)

    def loss(state):
        logits = nnx.merge(graphdef, state).forward(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
        return jnp.vdot(logits, jnp.asarray(cot))

    got = torch_state_dict(nnx.merge(graphdef, jax.grad(loss)(state)), TEXT_RULES)
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert rel_err(got[k], r) < TOL, k


def test_i2i_logits_match_hf_from_pixels(hf, cfg, full, pixels, hf_codes):
    """Two source images of different non-square grids go through our ViT + VQ (pixel_values in both)."""
    seq, grids = i2i_prompt("turn it blue", SOURCES, (3, 2))
    ids, mask = left_pad([seq])
    ref = hf_logits(hf, ids, mask, [grids], pixel_values=pixels)
    grid_hw = tuple((h, w) for h, w in SOURCES)
    codes = np.asarray(full.image_tokens(jnp.asarray(pixels.numpy()), grid_hw))
    np.testing.assert_array_equal(codes, hf_codes)
    ids_codes = np.asarray(full.insert_image_tokens(jnp.asarray(ids), jnp.asarray(pixels.numpy()), grid_hw))
    assert not np.any(ids_codes == IMAGE)
    pos, _ = positions(cfg, ids_codes, mask, [grids])
    np.testing.assert_array_equal(pos, positions(cfg, ids, mask, [grids])[0])  # placeholders or codes: same
    got = np.asarray(full.forward(jnp.asarray(ids_codes), jnp.asarray(pos), jnp.asarray(mask)))
    assert rel_err(got, ref) < TOL


def test_i2i_logits_match_hf_with_codes_in_prompt(hf, cfg, text_only, pixels, hf_codes):
    """The text path alone on an i2i prompt whose placeholders already hold transformers' codes."""
    split = np.split(hf_codes, np.cumsum([h * w for h, w in SOURCES])[:-1])
    seq, grids = i2i_prompt("turn it blue", SOURCES, (3, 2))
    seq_codes, _ = i2i_prompt("turn it blue", SOURCES, (3, 2), codes=[list(c) for c in split])
    ids, mask = left_pad([seq])
    ref = hf_logits(hf, ids, mask, [grids], pixel_values=pixels)
    pos, _ = positions(cfg, np.array([seq_codes]), mask, [grids])
    got = np.asarray(text_only.forward(jnp.asarray([seq_codes]), jnp.asarray(pos), jnp.asarray(mask)))
    assert rel_err(got, ref) < TOL


def test_scatter_image_codes_is_masked_scatter():
    rng = np.random.default_rng(0)
    ids = rng.integers(130, 386, size=(3, 11))
    ids[rng.random(ids.shape) < 0.4] = IMAGE
    codes = rng.integers(0, N_CODES, size=int((ids == IMAGE).sum()))
    ref = torch.tensor(ids).masked_scatter(torch.tensor(ids == IMAGE), torch.tensor(codes)).numpy()
    np.testing.assert_array_equal(np.asarray(scatter_image_codes(jnp.asarray(ids), jnp.asarray(codes), IMAGE)), ref)


def test_bf16_compute_stays_close_to_fp32(cfg, text_only, batch):
    """bf16 activations (fp32 params, fp32 softmax / norms statistics) give logits close to fp32, cache included."""
    model = GlmImageAR(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(2), with_vision=False)
    nnx.update(model, nnx.state(text_only, nnx.Param))
    ids, pos, mask = (jnp.asarray(batch[k]) for k in ("full_ids", "full_pos", "full_mask"))
    ref = np.asarray(text_only.forward(ids, pos, mask))
    got = model.forward(ids, pos, mask)
    assert got.dtype == jnp.float32
    valid = batch["full_mask"] == 1
    assert rel_err(np.asarray(got)[valid], ref[valid]) < 3e-2
    length = batch["ids"].shape[1]
    cache = model.init_cache(2, length + 1)
    assert cache.k[0].dtype == jnp.bfloat16
    last, _ = model.prefill(ids[:, :length], pos[:, :, :length], mask[:, :length], cache)
    assert rel_err(np.asarray(last), ref[:, length - 1]) < 3e-2


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.fixture(scope="module")
def fns(text_only):
    """Jitted (state, prefill, decode, extend, forward) of the text-only model; decode / extend donate the cache."""
    graphdef, state = nnx.split(text_only)

    @jax.jit
    def prefill(state, ids, pos, mask, cache):
        return nnx.merge(graphdef, state).prefill(ids, pos, mask, cache)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def decode(state, tok, pos, cache, index):
        return nnx.merge(graphdef, state).decode(tok, pos, cache, index)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def extend(state, ids, pos, cache, index):
        model = nnx.merge(graphdef, state)
        h, cache = model.extend(ids, pos, cache, index)
        return model.logits(h), cache

    @jax.jit
    def forward(state, ids, pos, mask):
        return nnx.merge(graphdef, state).forward(ids, pos, mask)

    return state, prefill, decode, extend, forward


@pytest.fixture(scope="module")
def batch(cfg, hf_codes):
    """A left-padded batch: an i2i prompt (codes in place) and a shorter t2i prompt, plus K sampled codes each."""
    split = np.split(hf_codes, np.cumsum([h * w for h, w in SOURCES])[:-1])
    a, ga = i2i_prompt("blue", SOURCES, (2, 3), codes=[list(c) for c in split])
    b, gb = t2i_prompt("fox", (2, 2), (1, 3))
    ids, mask = left_pad([a, b])
    pos, dec = positions(cfg, ids, mask, [ga, gb])
    k = 6
    gen = np.random.default_rng(1).integers(0, N_CODES, size=(2, k))
    full_ids = np.concatenate([ids, gen], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(gen)], axis=1)
    full_pos = np.concatenate([pos, dec[:, :, :k]], axis=2)
    return {"ids": ids, "mask": mask, "pos": pos, "dec": dec, "gen": gen, "full_ids": full_ids,
            "full_mask": full_mask, "full_pos": full_pos, "seqs": [a, b], "grids": [ga, gb]}


def test_prefill_decode_matches_full_forward(text_only, fns, batch):
    state, prefill, decode, _, forward = fns
    ref = np.asarray(forward(state, batch["full_ids"], batch["full_pos"], batch["full_mask"]))
    b, length = batch["ids"].shape
    k = batch["gen"].shape[1]
    cache = text_only.init_cache(b, length + k + 3, jnp.float32)
    logits, cache = prefill(state, batch["ids"], batch["pos"], batch["mask"], cache)
    got = [np.asarray(logits)]
    for n in range(k - 1):
        logits, cache = decode(state, jnp.asarray(batch["gen"][:, n]), jnp.asarray(batch["dec"][:, :, n]),
                               cache, jnp.int32(length + n))
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    assert rel_err(got, ref[:, length - 1: length + k - 1]) < TOL
    assert np.asarray(cache.valid).sum(1).tolist() == [int(batch["mask"][i].sum()) + k - 1 for i in range(b)]


def test_extend_chunk_matches_full_forward(text_only, fns, batch):
    state, prefill, _, extend, forward = fns
    ref = np.asarray(forward(state, batch["full_ids"], batch["full_pos"], batch["full_mask"]))
    b, length = batch["ids"].shape
    k = batch["gen"].shape[1]
    cache = text_only.init_cache(b, length + k, jnp.float32)
    _, cache = prefill(state, batch["ids"], batch["pos"], batch["mask"], cache)
    logits, _ = extend(state, batch["gen"], batch["full_pos"][:, :, length:], cache, jnp.int32(length))
    assert rel_err(np.asarray(logits), ref[:, length:]) < TOL


def test_left_padded_batch_equals_each_sample_alone(cfg, text_only, fns, batch):
    state, prefill, decode, _, forward = fns
    ref = np.asarray(forward(state, batch["full_ids"], batch["full_pos"], batch["full_mask"]))
    k = batch["gen"].shape[1]
    for i, (seq, grids) in enumerate(zip(batch["seqs"], batch["grids"])):
        ids, mask = left_pad([seq])
        pos, dec = positions(cfg, ids, mask, [grids])
        f_ids = np.concatenate([ids, batch["gen"][i:i + 1]], axis=1)
        f_pos = np.concatenate([pos, dec[:, :, :k]], axis=2)
        alone = np.asarray(forward(state, f_ids, f_pos, np.ones_like(f_ids)))
        valid = batch["full_mask"][i] == 1
        assert rel_err(ref[i, valid], alone[0]) < TOL
        cache = text_only.init_cache(1, len(seq) + 2, jnp.float32)
        last, cache = prefill(state, ids, pos, mask, cache)
        nxt, _ = decode(state, jnp.asarray(batch["gen"][i:i + 1, 0]), jnp.asarray(dec[:, :, 0]), cache,
                        jnp.int32(len(seq)))
        assert rel_err(np.asarray(last)[0], ref[i, -k - 1]) < TOL
        assert rel_err(np.asarray(nxt)[0], ref[i, -k]) < TOL


def test_fused_qkv_decode_keeps_lora_adapters():
    """One-token decode steps fuse q/k/v into one matmul; LoRA adapters on q/k/v must still apply there."""
    from glm_jax.lora import LoraConfig, add_lora
    from glm_jax.tiny import tiny_ar_config

    cfg = ArConfig.from_hf(tiny_ar_config())
    m = GlmImageAR(cfg, rngs=nnx.Rngs(0), with_vision=False)
    add_lora(m, LoraConfig(rank=4, alpha=8.0, targets=("attention",)), rngs=nnx.Rngs(1))
    for i, layer in enumerate(m.text.layers):   # non-zero adapters
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            p.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), p.lora_b.get_value().shape))
    b, length = 2, 7
    ids = jax.random.randint(jax.random.key(3), (b, length), 0, cfg.text.vision_vocab_size)
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, b, length))
    full = m.forward(ids, pos)
    outs = {}
    for fused in (True, False):
        for layer in m.text.layers:
            layer.self_attn.fuse_qkv = fused
        cache = m.init_cache(b, length)
        _, cache = m.prefill(ids[:, :-1], pos[:, :, :-1], None, cache)
        outs[fused], _ = m.decode(ids[:, -1], pos[:, :, -1], cache, length - 1)
    scale = float(jnp.abs(full[:, -1]).max())
    assert float(jnp.abs(outs[True] - full[:, -1]).max()) < 1e-5 * scale
    assert float(jnp.abs(outs[True] - outs[False]).max()) < 1e-5 * scale


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_layer_remat_keeps_loss_and_gradients(policy):
    """Rematerialised AR layers (training memory) give the same loss and parameter gradients."""
    from glm_jax.tiny import tiny_ar_config

    cfg = ArConfig.from_hf(tiny_ar_config())
    m = GlmImageAR(cfg, rngs=nnx.Rngs(0), with_vision=False)
    b, length = 2, 9
    ids = jax.random.randint(jax.random.key(1), (b, length), 0, cfg.text.vision_vocab_size)
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, b, length))
    mask = jnp.ones((b, length), bool).at[0, :2].set(False)
    graphdef, state = nnx.split(m)

    def loss(state, remat):
        model = nnx.merge(graphdef, state)
        model.text.remat = remat
        return jnp.mean(jax.nn.log_softmax(model.forward(ids, pos, mask))[..., 3] * mask)

    ref_l, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, "none")
    l, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, policy)
    assert abs(float(l) - float(ref_l)) <= 1e-6 * abs(float(ref_l))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref_g)) > 0


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_layer_remat_with_lora_keeps_loss_and_adapter_gradients(policy):
    """LoRA training under rematerialisation: only the adapters are differentiated while the base kernels are
    frozen (variables of two traces in one layer); loss and adapter gradients equal the un-rematerialised ones."""
    from glm_jax.lora import LoraConfig, add_lora, lora_trainable
    from glm_jax.tiny import tiny_ar_config

    cfg = ArConfig.from_hf(tiny_ar_config())
    m = GlmImageAR(cfg, rngs=nnx.Rngs(0), with_vision=False)
    add_lora(m, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(2))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(m, lora_trainable))):
        if path[-1] == "lora_b":                          # non-zero B, so that both factors get gradients
            var.set_value(jax.random.normal(jax.random.key(10 + i), var.get_value().shape) * 0.1)
    b, length = 2, 9
    ids = jax.random.randint(jax.random.key(1), (b, length), 0, cfg.text.vision_vocab_size)
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, b, length))
    mask = jnp.ones((b, length), bool).at[0, :2].set(False)
    graphdef, adapters, frozen = nnx.split(m, lora_trainable, ...)

    def loss(adapters, frozen, remat):
        model = nnx.merge(graphdef, adapters, frozen)
        model.text.remat = remat
        return jnp.mean(jax.nn.log_softmax(model.forward(ids, pos, mask))[..., 3] * mask)

    ref_l, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(adapters, frozen, "none")
    l, g = jax.jit(jax.value_and_grad(loss), static_argnums=2)(adapters, frozen, policy)
    assert abs(float(l) - float(ref_l)) <= 1e-6 * abs(float(ref_l))
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)
    assert min(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref_g)) > 0
