"""LoRA on the tiny GLM-Image AR and DiT (fp32, CPU): zero-B adapters keep the base outputs exactly and sit only on
the targeted layers; random adapters equal the merged kernels `W + alpha/rank A B`; a GRPO update trains only the
adapters with an adapter-sized optimizer state and `adapters_off` as the base-model reference; a checkpoint with
adapters exports to PyTorch merged (checked against torch-computed weights and torch outputs) or as base + PEFT
adapter files, and loads merged or with its adapters; clear errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from ml_collections import ConfigDict

from conversion import to_torch
from conversion.safetensors_io import SafetensorsFile
from conversion.table import find_jax
from glm_jax import lora as L
from glm_jax.checkpoint import MANIFEST, load_model, load_params, read_manifest, save_params
from glm_jax.components import COMPONENTS
from glm_jax.grpo import optim as O
from glm_jax.grpo import train_step as T
from glm_jax.models import positions as P
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.models.dit import DiTConfig, GlmImageDiT
from glm_jax.models.layers import Dense
from glm_jax.pipeline import ar_prompts_from_ids, sched_arrays
from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams, score_tokens
from glm_jax.sampling.flow import make_cond
from glm_jax.sampling.schedule import flow_schedule
from glm_jax.tiny import (
    EOS_ID,
    N_CODES,
    scheduler_config,
    tiny_ar_config,
    tiny_dit_config,
    tiny_tokenizer,
    write_tiny_checkpoint,
)
from tests.test_positions import left_pad, t2i_prompt
from tests.util import rel_err

AR_CFG = ArConfig.from_hf(tiny_ar_config())
DIT_CFG = DiTConfig.from_hf(tiny_dit_config())
AR_SLOT, DIT_SLOT = "vision_language_encoder", "transformer"
AR_LAYERS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj")))
DIT_LAYERS = (("attn1", ("to_q", "to_k", "to_v", "to_out")), ("ff", ("proj_in", "proj_out")))
# slot -> (rank, alpha, targets) of the adapters written into the test checkpoint
CKPT_LORA = {AR_SLOT: (3, 5.0, ("attention", "mlp")), DIT_SLOT: (2, 3.0, ("attention", "mlp"))}


def expected_paths(kind: str, groups=("attention", "mlp")) -> set[str]:
    prefix, n, layers = (("text.layers", AR_CFG.text.num_layers, AR_LAYERS) if kind == "ar"
                         else ("transformer_blocks", DIT_CFG.num_layers, DIT_LAYERS))
    return {f"{prefix}.{i}.{mod}.{name}" for i in range(n) for g, (mod, names) in zip(("attention", "mlp"), layers)
            if g in groups for name in names}


def flat_params(module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def set_flat(module, flat: dict[str, np.ndarray]) -> None:
    state = nnx.state(module, nnx.Param)
    for p, v in nnx.to_flat_state(state):
        v.set_value(jnp.asarray(flat[".".join(map(str, p))]))
    nnx.update(module, state)


def randomize_adapters(module, seed: int, std: float = 0.1) -> None:
    rng = np.random.default_rng(seed)
    state = nnx.state(module, L.LoraParam)
    for _, v in nnx.to_flat_state(state):
        v.set_value(jnp.asarray(rng.normal(0, std, v.get_value().shape), jnp.float32))
    nnx.update(module, state)


# ------------------------------------------------------------------------------------------ forwards (jitted)


def _ar_fwd(state, graphdef, ids, pos, mask):
    return nnx.merge(graphdef, state).forward(ids, pos, mask)


_ar_fwd = jax.jit(_ar_fwd, static_argnums=1)


def ar_forward(module, x):
    graphdef, state = nnx.split(module)
    return np.asarray(_ar_fwd(state, graphdef, *x))


def _dit_fwd(state, graphdef, *args):
    return nnx.merge(graphdef, state)(*args)[0]


_dit_fwd = jax.jit(_dit_fwd, static_argnums=1)


def dit_forward(module, x):
    graphdef, state = nnx.split(module)
    return np.asarray(_dit_fwd(state, graphdef, *x))


@pytest.fixture(scope="module")
def ar_inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, AR_CFG.text.vocab_size, (2, 11))
    mask = np.ones((2, 11), bool)
    mask[1, :4] = False                                        # left padding
    pos = np.broadcast_to(np.maximum(np.cumsum(mask, 1) - 1, 0), (3, 2, 11)).copy()
    pos[1] += 2                                                # t / h / w differ
    pos[2] *= 2
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)


def make_dit_inputs(seed: int, b: int, h: int, w: int, t: int):
    rng = np.random.default_rng(seed)
    n = (h // 2) * (w // 2)
    return (jnp.asarray(rng.standard_normal((b, h, w, 16)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, t, DIT_CFG.text_embed_dim)), jnp.float32),
            jnp.asarray(rng.integers(0, N_CODES, (b, n)), jnp.int32), jnp.asarray(rng.random((b, n)) < 0.3),
            jnp.asarray(rng.uniform(0, 999, b).round(), jnp.float32),
            jnp.asarray([[64, 96], [128, 32]][:b], jnp.float32), jnp.asarray([[0, 16], [32, 0]][:b], jnp.float32))


@pytest.fixture(scope="module")
def dit_inputs():
    return make_dit_inputs(1, 2, 6, 4, 3)


# ------------------------------------------------------------------------------------------ add_lora


@pytest.mark.parametrize("kind", ["ar", "dit"])
def test_zero_b_adapters_keep_outputs_and_sit_only_on_targets(kind, ar_inputs, dit_inputs):
    make = (lambda: GlmImageAR(AR_CFG, rngs=nnx.Rngs(0))) if kind == "ar" else \
        (lambda: GlmImageDiT(DIT_CFG, rngs=nnx.Rngs(0)))
    fwd, x = (ar_forward, ar_inputs) if kind == "ar" else (dit_forward, dit_inputs)
    module = make()
    base_keys = set(flat_params(module))
    base_out = fwd(module, x)
    paths = L.add_lora(module, L.LoraConfig(rank=3, alpha=5.0), rngs=nnx.Rngs(1))
    assert set(paths) == expected_paths(kind) and len(paths) == len(expected_paths(kind))
    np.testing.assert_array_equal(fwd(module, x), base_out)   # B = 0: exactly the base model
    flat = flat_params(module)
    lora_keys = {k for k in flat if L.is_adapter_key(k)}
    assert lora_keys == {p + s for p in paths for s in (".lora_a", ".lora_b")}
    assert set(flat) - lora_keys == base_keys                 # nothing else added or removed
    for p in paths:
        dense = L._dense_at(module, p)
        in_axis, out_axis = dense.kernel.get_metadata()["axes"]
        assert dense.lora_a.get_value().shape == (dense.in_features, 3)
        assert dense.lora_b.get_value().shape == (3, dense.out_features)
        assert dense.lora_a.get_metadata()["axes"] == (in_axis, None)
        assert dense.lora_b.get_metadata()["axes"] == (None, out_axis)
        assert np.all(np.asarray(dense.lora_b.get_value()) == 0) and np.std(np.asarray(dense.lora_a.get_value())) > 0
        assert dense.lora_scale == 5.0 / 3
    # attention only
    only = make()
    paths = L.add_lora(only, L.LoraConfig(rank=2, alpha=2.0, targets=("attention",)), rngs=nnx.Rngs(1))
    assert set(paths) == expected_paths(kind, ("attention",))
    with pytest.raises(ValueError, match="already has adapters"):
        L.add_lora(only, L.LoraConfig(rank=2, alpha=2.0, targets=("attention",)), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("kind", ["ar", "dit"])
def test_random_adapters_equal_merged_kernels(kind, ar_inputs, dit_inputs):
    if kind == "ar":
        module, plain = GlmImageAR(AR_CFG, rngs=nnx.Rngs(0)), GlmImageAR(AR_CFG, rngs=nnx.Rngs(5))
        fwd, x = ar_forward, ar_inputs
    else:
        module, plain = GlmImageDiT(DIT_CFG, rngs=nnx.Rngs(0)), GlmImageDiT(DIT_CFG, rngs=nnx.Rngs(5))
        fwd, x = dit_forward, dit_inputs
    base_out = fwd(module, x)
    rank, alpha = 4, 7.0
    L.add_lora(module, L.LoraConfig(rank=rank, alpha=alpha), rngs=nnx.Rngs(1))
    randomize_adapters(module, 2, std=0.1 if kind == "ar" else 0.5)   # the DiT blocks are damped by their gates
    adapted = fwd(module, x)
    assert rel_err(adapted, base_out) > 3e-3                   # the adapters matter
    flat = flat_params(module)
    merged = L.merge_flat(flat, rank, alpha)
    assert not any(L.is_adapter_key(k) for k in merged) and set(merged) == set(flat_params(plain))
    for k, v in merged.items():
        base = k.removesuffix(".kernel")
        if base + ".lora_a" in flat:   # independent float64 reference
            want = flat[k].astype(np.float64) + alpha / rank * (flat[base + ".lora_a"].astype(np.float64)
                                                                @ flat[base + ".lora_b"].astype(np.float64))
            np.testing.assert_allclose(v, want, atol=1e-6, rtol=0)
        else:
            np.testing.assert_array_equal(v, flat[k])
    set_flat(plain, merged)
    got = fwd(plain, x)
    assert rel_err(got, adapted) < 1e-5
    assert rel_err(got - base_out, adapted - base_out) < 1e-3   # the adapters' own contribution agrees


def test_merge_flat_keeps_kernel_dtype():
    rng = np.random.default_rng(0)
    k = rng.normal(0, 1, (5, 7)).astype(ml_dtypes.bfloat16)
    a, b = rng.normal(0, 1, (5, 2)).astype(np.float32), rng.normal(0, 1, (2, 7)).astype(np.float32)
    out = L.merge_flat({"x.kernel": k, "x.lora_a": a, "x.lora_b": b, "y.bias": np.ones(3, np.float32)}, 2, 4.0)
    assert set(out) == {"x.kernel", "y.bias"} and out["x.kernel"].dtype == k.dtype
    want = (k.astype(np.float32) + 2.0 * (a @ b)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out["x.kernel"].astype(np.float32), want.astype(np.float32))


# ------------------------------------------------------------------------------------------ GRPO steps


def t2i_ids(text: str, layout: ArLayout) -> list[int]:
    grids = "".join(f"<sop>{h} {w}<eop>" for h, w in reversed(layout.gen_grids))
    return tiny_tokenizer().encode(f"{text}{grids}<|dit_token_16384|>").ids


def ar_batch(seed: int):
    layout = ArLayout.t2i(64, 64)
    texts = ["a red fox", "a sign that says 'OK'", "blue", "two cats on a mat"]
    grids = [[1, *g] for g in reversed(layout.gen_grids)]
    pr = ar_prompts_from_ids([t2i_ids(t, layout) for t in texts], [grids] * len(texts), layout, AR_CFG)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N_CODES, (len(texts), layout.n_tokens)).astype(np.int32)
    tokens[:, -1] = EOS_ID
    mask = np.broadcast_to(layout.loss_mask(), tokens.shape)
    return T.ArBatch(jnp.asarray(pr.input_ids), jnp.asarray(pr.attention_mask), jnp.asarray(pr.position_ids),
                     jnp.asarray(pr.decode_positions), jnp.asarray(tokens), jnp.asarray(mask),
                     jnp.asarray(rng.standard_normal(len(texts)), jnp.float32), jnp.ones(len(texts), jnp.float32))


def dit_batch(seed: int):
    rng = np.random.default_rng(seed)
    b, j, h, w = 4, 2, 32, 32
    lat = (b, j, h // 8, w // 8, 16)
    cond = make_cond(jnp.asarray(rng.standard_normal((b, 3, DIT_CFG.text_embed_dim)), jnp.float32),
                     jnp.asarray(rng.integers(0, N_CODES, (b, (h // 16) * (w // 16)))), h, w)
    sched = sched_arrays(flow_schedule(4, h, w, scheduler_config()))
    return T.DitBatch(jnp.asarray(rng.standard_normal(lat), jnp.float32),
                      jnp.asarray(rng.standard_normal(lat), jnp.float32), jnp.asarray([[0, 1]] * b, jnp.int32),
                      jnp.asarray(rng.standard_normal(b), jnp.float32), jnp.ones(b, jnp.float32), cond, sched,
                      jnp.asarray(0.7, jnp.float32))


def _score(state, graphdef, batch, sampling):
    s = score_tokens(nnx.merge(graphdef, state), batch.input_ids, batch.attention_mask, batch.position_ids,
                     batch.decode_positions, batch.tokens, sampling, n_codes=N_CODES, eos_id=EOS_ID)
    return s.logprobs


_score = jax.jit(_score, static_argnums=(1, 3))


def assert_opt_state_adapter_sized(policy):
    shapes = {x.shape for x in jax.tree.leaves(policy.params)}
    n_params = sum(x.size for x in jax.tree.leaves(policy.params))
    leaves = jax.tree.leaves(policy.opt_state)
    assert all(x.ndim == 0 or x.shape in shapes for x in leaves), {x.shape for x in leaves} - shapes
    assert sum(x.size for x in leaves) <= 2 * n_params + 8    # AdamW mu + nu (+ counters)


@pytest.mark.parametrize("kind", ["ar", "dit"])
def test_grpo_step_trains_only_adapters_with_base_reference(kind):
    sampling = SamplingParams(temperature=1.0, top_k=None, top_p=1.0)   # every code in the support
    if kind == "ar":
        module = GlmImageAR(AR_CFG, rngs=nnx.Rngs(0), with_vision=False)
        base = GlmImageAR(AR_CFG, rngs=nnx.Rngs(0), with_vision=False)
        batch = ar_batch(0)
    else:
        module, base, batch = GlmImageDiT(DIT_CFG, rngs=nnx.Rngs(0)), GlmImageDiT(DIT_CFG, rngs=nnx.Rngs(0)), \
            dit_batch(0)
    L.add_lora(module, L.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    tx = O.make_optimizer(O.OptimConfig(lr=1e-2 if kind == "ar" else 1e-1, grad_clip=1.0, weight_decay=0.0))
    graphdef, policy = T.init_policy(module, tx, L.lora_trainable)
    assert all(L.is_adapter_key(".".join(map(str, p))) for p, _ in nnx.to_flat_state(policy.params))
    assert not any(isinstance(v, L.LoraParam) for _, v in nnx.to_flat_state(policy.frozen))
    assert_opt_state_adapter_sized(policy)
    if kind == "ar":
        spec = T.ArSpec(graphdef, tx, T.ArLossConfig(n_codes=N_CODES, eos_id=EOS_ID, sampling=sampling, beta=0.1))
        update, part = T.ar_update_jit, "ar"
    else:
        spec = T.DitSpec(graphdef, tx, T.DitLossConfig(clip_range=1e-3, beta=0.1, guidance=1.0))
        update, part = T.dit_update_jit, "dit"
    ts = T.init_train_state(jax.random.key(0), **{part: policy})
    ref = L.adapters_off(policy.params)
    frozen0 = jax.tree.map(np.asarray, policy.frozen)
    params0 = jax.tree.map(np.asarray, policy.params)
    ts, m1 = update(spec, ts, batch, ref)
    assert float(m1["kl_loss"]) == 0.0                          # policy == base == reference at init
    ts, m2 = update(spec, ts, batch, ref)                       # ref survives the donation of ts
    assert float(m2["kl_loss"]) > 0
    new = getattr(ts, part)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.tree.map(np.asarray, new.frozen), frozen0))
    moved = [float(np.abs(np.asarray(a) - b).max()) for (p, a), (_, b) in
             zip(nnx.to_flat_state(new.params), nnx.to_flat_state(params0)) if str(p[-1]) == "lora_b"]
    assert min(moved) > 0
    assert_opt_state_adapter_sized(new)

    # the reference (adapters_off of the trained adapters) is the base model; the policy is not
    ref_model = nnx.merge(graphdef, L.adapters_off(new.params), new.frozen)
    pol_model = nnx.merge(graphdef, new.params, new.frozen)
    if kind == "ar":
        def lp(m):
            gd, state = nnx.split(m)
            return np.asarray(_score(state, gd, batch, sampling))
        got_ref, got_base, got_pol = lp(ref_model), lp(base), lp(pol_model)
    else:
        x = make_dit_inputs(3, 2, 4, 6, 2)
        got_ref, got_base, got_pol = (dit_forward(m, x) for m in (ref_model, base, pol_model))
    np.testing.assert_array_equal(got_ref, got_base)          # bitwise: zero B adds exact zeros
    assert np.abs(got_pol - got_base).max() > 1e-4


# ------------------------------------------------------------------------------------------ checkpoints


def _abstract(slot: str):
    spec = COMPONENTS[slot]
    cfg = spec.config_from_hf({AR_SLOT: tiny_ar_config, DIT_SLOT: tiny_dit_config}[slot]())
    return nnx.eval_shape(lambda: spec.model_class()(cfg, rngs=nnx.Rngs(0)))


def add_adapters_to_checkpoint(ckpt: str, seed: int) -> dict:
    """Writes random adapters for `CKPT_LORA` into a glm_jax checkpoint; returns `{slot: flat with adapters}`."""
    rng = np.random.default_rng(seed)
    manifest = read_manifest(ckpt)
    out = {}
    for slot, (rank, alpha, targets) in CKPT_LORA.items():
        pdir = os.path.join(ckpt, slot, "params")
        flat = {k: np.asarray(v) for k, v in load_params(pdir).items()}
        for p in L.target_paths(_abstract(slot), targets):
            d_in, d_out = flat[p + ".kernel"].shape
            flat[p + ".lora_a"] = rng.normal(0, 0.1, (d_in, rank)).astype(np.float32)
            flat[p + ".lora_b"] = rng.normal(0, 0.1, (rank, d_out)).astype(np.float32)
        shutil.rmtree(pdir)
        save_params(pdir, flat)
        manifest.setdefault("lora", {})[slot] = L.LoraConfig(rank, alpha, targets).to_manifest()
        out[slot] = flat
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return out


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ckpt = write_tiny_checkpoint(str(root / "ckpt"), seed=3)
    flats = add_adapters_to_checkpoint(ckpt, 4)
    merged, separate = str(root / "merged"), str(root / "separate")
    assert to_torch.main(["--src", ckpt, "--dst", merged]) == 0
    assert to_torch.main(["--src", ckpt, "--dst", separate, "--lora", "separate"]) == 0
    return {"ckpt": ckpt, "flats": flats, "merged": merged, "separate": separate, "root": root}


def torch_module_name(slot: str, dense_path: str) -> str:
    return find_jax(COMPONENTS[slot].rules(), dense_path + ".kernel")[0].removesuffix(".weight")


def read_dir(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            f = SafetensorsFile(os.path.join(directory, name))
            out.update({k: f.load(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
            f.close()
    return out


def torch_models(directory: str):
    from diffusers import GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration
    ar = GlmImageForConditionalGeneration.from_pretrained(os.path.join(directory, AR_SLOT)).eval()
    dit = GlmImageTransformer2DModel.from_pretrained(os.path.join(directory, DIT_SLOT)).eval()
    return {AR_SLOT: ar, DIT_SLOT: dit}


def test_merged_export_has_w_plus_scaled_ba_in_torch(lora_ckpt):
    models = torch_models(lora_ckpt["merged"])
    for slot, (rank, alpha, _) in CKPT_LORA.items():
        flat = lora_ckpt["flats"][slot]
        sd = models[slot].state_dict()
        pairs = L.adapter_pairs(flat)
        assert pairs
        for base, (ka, kb) in pairs.items():
            name = torch_module_name(slot, base)
            w = torch.from_numpy(flat[base + ".kernel"].T.copy())
            a_t, b_t = torch.from_numpy(flat[ka].T.copy()), torch.from_numpy(flat[kb].T.copy())  # (r, in), (out, r)
            want = w + (alpha / rank) * (b_t @ a_t)
            torch.testing.assert_close(sd[name + ".weight"], want, atol=1e-6, rtol=0)
        # untouched weights stay bit-exact
        for key in ("lm_head.kernel", "text.layers.0.input_layernorm.weight", "transformer_blocks.1.norm1.linear.kernel",
                    "proj_out.kernel"):
            if key in flat:
                tname, rule = find_jax(COMPONENTS[slot].rules(), key)
                got = sd[tname].numpy()
                np.testing.assert_array_equal(got, flat[key].T if rule.transform == "linear" else flat[key])


def test_merged_export_outputs_match_glm_jax(lora_ckpt):
    ckpt = lora_ckpt["ckpt"]
    models = torch_models(lora_ckpt["merged"])
    # DiT
    _, dit = load_model(ckpt, DIT_SLOT)
    _, dit_keep = load_model(ckpt, DIT_SLOT, lora="keep")
    x = make_dit_inputs(5, 2, 6, 4, 3)
    with torch.no_grad():
        ref = models[DIT_SLOT](hidden_states=torch.from_numpy(np.asarray(x[0]).transpose(0, 3, 1, 2).copy()),
                               encoder_hidden_states=torch.from_numpy(np.array(x[1])),
                               prior_token_id=torch.from_numpy(np.asarray(x[2]).astype(np.int64)),
                               prior_token_drop=torch.from_numpy(np.asarray(x[3])),
                               timestep=torch.from_numpy(np.asarray(x[4])), target_size=torch.from_numpy(np.asarray(x[5])),
                               crop_coords=torch.from_numpy(np.asarray(x[6])), return_dict=False)[0]
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert rel_err(dit_forward(dit, x), ref) < 1e-5
    assert rel_err(dit_forward(dit_keep, x), ref) < 1e-5
    # AR (t2i prompts, left padded)
    _, ar = load_model(ckpt, AR_SLOT)
    (a, ga), (b, gb) = t2i_prompt("a red fox in snow", (3, 5), (2, 3)), t2i_prompt("cat", (4, 2), (3, 2))
    ids, mask = left_pad([a, b])
    with torch.no_grad():
        hf = models[AR_SLOT](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             image_grid_thw=torch.tensor(ga + gb), images_per_sample=torch.tensor([2, 2])).logits
    pos, _ = P.prompt_position_ids(ids, mask, [ga, gb], AR_CFG)
    got = ar_forward(ar, (jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
    valid = mask == 1
    assert rel_err(got[valid], hf.numpy()[valid]) < 1e-5


def test_load_model_merges_or_keeps_adapters(lora_ckpt, ar_inputs):
    ckpt = lora_ckpt["ckpt"]
    for slot, (rank, alpha, targets) in CKPT_LORA.items():
        flat = lora_ckpt["flats"][slot]
        _, merged = load_model(ckpt, slot)
        got = flat_params(merged)
        want = L.merge_flat(flat, rank, alpha)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
        _, kept = load_model(ckpt, slot, lora="keep")
        kept_flat = flat_params(kept)
        assert set(kept_flat) == set(flat)
        for k, v in flat.items():
            np.testing.assert_array_equal(kept_flat[k], v, err_msg=k)
        assert set(L.target_paths(kept, targets)) == set(L.adapter_pairs(flat))
    _, ar_merged = load_model(ckpt, AR_SLOT)
    _, ar_kept = load_model(ckpt, AR_SLOT, lora="keep")
    assert rel_err(ar_forward(ar_kept, ar_inputs), ar_forward(ar_merged, ar_inputs)) < 1e-5


def test_separate_export_writes_base_and_peft_adapters(lora_ckpt):
    merged_dir, sep = lora_ckpt["merged"], lora_ckpt["separate"]
    for slot, (rank, alpha, _) in CKPT_LORA.items():
        flat = lora_ckpt["flats"][slot]
        base_t, merged_t = read_dir(os.path.join(sep, slot)), read_dir(os.path.join(merged_dir, slot))
        assert set(base_t) == set(merged_t)
        adapter = read_dir(os.path.join(sep, f"{slot}_lora"))
        with open(os.path.join(sep, f"{slot}_lora", "adapter_config.json")) as f:
            conf = json.load(f)
        assert conf["peft_type"] == "LORA" and conf["r"] == rank and conf["lora_alpha"] == alpha
        pairs = L.adapter_pairs(flat)
        names = {torch_module_name(slot, p) for p in pairs}
        assert set(conf["target_modules"]) == names
        assert set(adapter) == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
        for base, (ka, kb) in pairs.items():
            n = torch_module_name(slot, base)
            a_t, b_t = adapter[f"{n}.lora_A.weight"], adapter[f"{n}.lora_B.weight"]
            assert a_t.shape == (rank, flat[ka].shape[0]) and b_t.shape == (flat[kb].shape[1], rank)
            np.testing.assert_array_equal(base_t[n + ".weight"], flat[base + ".kernel"].T)   # the base, unmerged
            rebuilt = torch.from_numpy(base_t[n + ".weight"]) + conf["lora_alpha"] / conf["r"] * (
                torch.from_numpy(b_t) @ torch.from_numpy(a_t))
            np.testing.assert_allclose(rebuilt.numpy(), merged_t[n + ".weight"], atol=1e-6, rtol=0)
        for k in base_t:
            if not any(k == torch_module_name(slot, p) + ".weight" for p in pairs):
                np.testing.assert_array_equal(base_t[k], merged_t[k], err_msg=k)
    assert not os.path.exists(os.path.join(merged_dir, f"{AR_SLOT}_lora"))


# ------------------------------------------------------------------------------------------ errors


def test_config_errors_and_from_config():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        L.LoraConfig(rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="unknown LoRA target 'ffn'"):
        L.LoraConfig(rank=4, alpha=8.0, targets=("attention", "ffn"))
    with pytest.raises(ValueError, match="alpha"):
        L.LoraConfig(rank=4, alpha=0.0)
    section = ConfigDict(dict(enabled=True, rank=8, alpha=16.0, targets=" attention , mlp"))
    assert L.LoraConfig.from_config(section) == L.LoraConfig(8, 16.0, ("attention", "mlp"))
    section.targets = "attention"
    assert L.LoraConfig.from_config(section).targets == ("attention",)
    section.targets = "attention,bogus"
    with pytest.raises(ValueError, match="unknown LoRA target 'bogus'"):
        L.LoraConfig.from_config(section)
    section.enabled = False
    assert L.LoraConfig.from_config(section) is None
    with pytest.raises(ValueError, match="Dense has no LoRA targets"):
        L.add_lora(Dense(3, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0)), L.LoraConfig(2, 2.0), rngs=nnx.Rngs(0))


def test_adapter_keys_without_manifest_entry_are_named(lora_ckpt, capsys):
    bad = str(lora_ckpt["root"] / "no_manifest")
    shutil.copytree(lora_ckpt["ckpt"], bad)
    manifest = read_manifest(bad)
    del manifest["lora"][DIT_SLOT]
    with open(os.path.join(bad, MANIFEST), "w") as f:
        json.dump(manifest, f)
    key = min(k for k in lora_ckpt["flats"][DIT_SLOT] if L.is_adapter_key(k))
    with pytest.raises(ValueError, match=f"LoRA adapter key '{key}' but glm_jax.json has no"):
        load_model(bad, DIT_SLOT)
    assert to_torch.main(["--src", bad, "--dst", str(lora_ckpt["root"] / "bad_out")]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(lora_ckpt["root"] / "bad_out")
