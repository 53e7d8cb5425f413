"""Sharding on 8 simulated CPU devices: the AR and DiT GRPO update steps give the same loss, gradient norm and
new params on every mesh (1 device, data=8, fsdp=8, data=2 x fsdp=4, data=2 x fsdp=2 x tensor=2); parameter
shardings are what the rules say (odd sizes replicated, the fused gate|up kernel never split over `tensor`);
mesh config errors name the field; sharded loading of a glm_jax checkpoint and of a torch-layout safetensors
directory gives the plain load's params, reading each byte once.

The 8 devices must exist before jax starts: run alone with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, or let `test_suite_on_8_cpu_devices` start that
subprocess (the other tests are skipped in a process with fewer devices).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from glm_jax import sharding as S
from glm_jax.components import COMPONENTS
from glm_jax.grpo import optim as O
from glm_jax.grpo import train_step as T
from glm_jax.pipeline import ar_prompts_from_ids, ar_token_ids
from glm_jax.sampling.ar_sampler import ArLayout
from glm_jax.sampling.flow import make_cond
from glm_jax.sampling.schedule import flow_schedule
from glm_jax.tiny import scheduler_config, tiny_ar_config, tiny_dit_config, tiny_tokenizer
from tests.util import CPU_XLA_FLAGS, pytest_in_subprocess, rel_err

P = PartitionSpec
N_DEV = 8
HAVE_8 = jax.device_count() >= N_DEV
needs8 = pytest.mark.skipif(not HAVE_8, reason="needs 8 devices (run by test_suite_on_8_cpu_devices)")

AR_SLOT, DIT_SLOT = "vision_language_encoder", "transformer"
H = W = 64
B = 8
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def test_suite_on_8_cpu_devices():
    """Runs this file in a subprocess with 8 simulated CPU devices (when this process has fewer)."""
    if HAVE_8:
        pytest.skip("this process already has 8 devices")
    out = pytest_in_subprocess(__file__, f"--xla_force_host_platform_device_count={N_DEV} {CPU_XLA_FLAGS}", "-x")
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 14 and "failed" not in out, out[-2000:]


# ------------------------------------------------------------------------------------------------ helpers


def build(slot: str, seed: int):
    spec = COMPONENTS[slot]
    if slot == AR_SLOT:
        hf = tiny_ar_config()
        hf["text_config"]["num_hidden_layers"] = 1
    else:
        hf = dict(tiny_dit_config(), num_layers=1)
    cfg = spec.config_from_hf(hf)
    return cfg, spec.model_class()(cfg, rngs=nnx.Rngs(seed))


def tx():
    return O.make_optimizer(O.OptimConfig(lr=3e-3, grad_clip=1.0, weight_decay=0.01, eps=1e-3))


def ar_case():
    """Tiny AR policy (beta > 0 with a perturbed reference) and a batch of 8 left-padded prompts of different
    lengths with random code tokens, advantages and weights."""
    cfg, module = build(AR_SLOT, 1)
    n_codes, eos_id = ar_token_ids(cfg)
    layout = ArLayout.i2i(H, W)
    texts = ["a", "red fox", "a sign 'OK'", "blue sky over hills", "x", "two cats", "it's a 'B'", "tree"]
    grids = "".join(f"<sop>{h} {w}<eop>" for h, w in reversed(layout.gen_grids))
    ids = [tiny_tokenizer().encode(f"{t}{grids}<|dit_token_16384|>").ids for t in texts]
    prompts = ar_prompts_from_ids(ids, [[[1, *g] for g in reversed(layout.gen_grids)]] * B, layout, cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, n_codes, (B, layout.n_tokens)).astype(np.int32)
    tokens[:, -1] = eos_id
    mask = np.broadcast_to(np.asarray(layout.loss_mask()), tokens.shape)
    batch = T.ArBatch(jnp.asarray(prompts.input_ids), jnp.asarray(prompts.attention_mask),
                      jnp.asarray(prompts.position_ids), jnp.asarray(prompts.decode_positions), jnp.asarray(tokens),
                      jnp.asarray(mask), jnp.asarray(rng.standard_normal(B), jnp.float32),
                      jnp.asarray(rng.uniform(0.5, 1.0, B), jnp.float32))
    graphdef, policy = T.init_policy(module, tx(), T.ar_trainable)
    spec = T.ArSpec(graphdef, tx(), T.ArLossConfig(n_codes=n_codes, eos_id=eos_id, beta=0.05, chunk=64))
    ref = jax.tree.map(lambda x: x + 0.01 * jnp.std(x) * jax.random.normal(jax.random.key(5), x.shape),
                       policy.params)
    return spec, T.init_train_state(jax.random.key(0), ar=policy), batch, ref


def dit_case():
    """Tiny DiT policy and a batch of 8 samples x 2 stored SDE transitions with random latents, glyphs, prior
    ids, advantages and weights (micro-batches of 4 samples)."""
    _, module = build(DIT_SLOT, 2)
    rng = np.random.default_rng(1)
    h, w, c = H // 8, W // 8, 16
    x = rng.standard_normal((B, 2, h, w, c)).astype(np.float32)
    x_next = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    start = rng.integers(0, 3, B)
    steps = np.stack([start, start + 1], 1).astype(np.int32)
    glyph = jnp.asarray(rng.standard_normal((B, 5, 32)), jnp.float32)
    prior = jnp.asarray(rng.integers(0, 128, (B, (h // 2) * (w // 2))), jnp.int32)
    sched = flow_schedule(4, H, W, scheduler_config())
    batch = T.DitBatch(jnp.asarray(x), jnp.asarray(x_next), jnp.asarray(steps),
                       jnp.asarray(rng.standard_normal(B), jnp.float32),
                       jnp.asarray(rng.uniform(0.5, 1.0, B), jnp.float32), make_cond(glyph, prior, H, W),
                       (sched.timesteps, sched.sigmas), jnp.asarray(0.7, jnp.float32))
    graphdef, policy = T.init_policy(module, tx(), T.dit_trainable)
    spec = T.DitSpec(graphdef, tx(), T.DitLossConfig(clip_range=1e-3, micro_batch=4))
    return spec, T.init_train_state(jax.random.key(0), dit=policy), batch, None


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


_REF: dict = {}


def reference(part: str):
    """`(spec, ts0, batch, ref, metrics of 2 steps, params after 2 steps, initial params)` on one device by the
    plain `train_step.*_update_jit` (computed once per part)."""
    if part not in _REF:
        spec, ts0, batch, ref = (ar_case if part == "ar" else dit_case)()
        step = T.ar_update_jit if part == "ar" else T.dit_update_jit
        ts, m1 = step(spec, copy_tree(ts0), batch, ref)
        ts, m2 = step(spec, ts, batch, ref)
        _REF[part] = (spec, ts0, batch, ref, [jax.device_get(m1), jax.device_get(m2)],
                      host(getattr(ts, part).params), host(getattr(ts0, part).params))
    return _REF[part]


# ------------------------------------------------------------------------------------------- update steps


@needs8
@pytest.mark.parametrize("mesh_name", ["data8", "fsdp8", "data2_fsdp2_tensor2"])   # data2_fsdp4: the rollouts
@pytest.mark.parametrize("part", ["ar", "dit"])
def test_update_is_the_same_on_every_mesh(part, mesh_name):
    """Two donated, sharded update steps (AR: beta > 0 with a sharded reference; DiT: 2 micro-batches) give the
    one-device loss, gradient norm and parameter updates to float32 rounding, and keep the rule shardings, on
    each kind of mesh (data only, fsdp only, all three axes)."""
    spec, ts0, batch, ref, want_metrics, want_params, p0 = reference(part)
    mesh = S.make_mesh(MESHES[mesh_name])
    ts = S.shard_train_state(copy_tree(ts0), mesh)
    step = S.ShardedUpdate(part, spec, mesh, ts)
    metrics = []
    for _ in range(2):
        ts, m = step.update(ts, batch, ref)
        metrics.append(jax.device_get(m))
    for got, want in zip(metrics, want_metrics):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
        assert got["grad_norm"] > 0
    new = host(getattr(ts, part).params)
    for x, w, x0 in zip(new, want_params, p0, strict=True):
        upd, want_upd = x - x0, w - x0
        assert np.abs(upd - want_upd).max() <= 1e-4 * np.abs(want_upd).max() + 1e-9
    assert max(np.abs(w - x0).max() for w, x0 in zip(want_params, p0)) > 1e-4  # the params did move
    want_sh = S.train_state_shardings(ts, mesh)
    leaves = jax.tree.leaves(ts)
    for x, s in zip(leaves, jax.tree.leaves(want_sh), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
    n_split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(getattr(ts, part).params))
    assert (n_split == 0) == (mesh_name == "data8")


@needs8
def test_lora_update_gathers_the_frozen_base_once():
    """A LoRA update under an fsdp mesh gathers the frozen base weights once before its micro-batch scan
    (`gather_frozen`, `mesh.gather_frozen`), not at all with it off, and both give the same update."""
    from glm_jax.lora import LoraConfig, add_lora, lora_trainable
    spec0, _, batch, _ = dit_case()
    _, module = build(DIT_SLOT, 2)
    add_lora(module, LoraConfig(rank=4, alpha=4.0), rngs=nnx.Rngs(1))
    graphdef, policy = T.init_policy(module, tx(), lora_trainable)
    ts0 = T.init_train_state(jax.random.key(0), dit=policy)
    mesh = S.make_mesh(MESHES["data2_fsdp4"])
    frozen_split = [x for x in jax.tree.leaves(S.shard_train_state(copy_tree(ts0), mesh).dit.frozen)
                    if "fsdp" in str(x.sharding.spec)]
    assert len(frozen_split) > 5
    shapes = {tuple(x.shape) for x in frozen_split}
    results = []
    for gather in (True, False):
        spec = T.DitSpec(graphdef, tx(), dataclasses.replace(spec0.loss, gather_frozen=gather))
        ts = S.shard_train_state(copy_tree(ts0), mesh)
        with jax.set_mesh(mesh):
            n = gathered_outside_loops(shapes, partial(T.dit_update_step, spec, ts, batch))
        assert (n >= len(frozen_split)) if gather else (n == 0), (gather, n)
        ts, m = S.ShardedUpdate("dit", spec, mesh, ts).update(ts, batch)
        results.append((float(m["loss"]), host(ts.dit.params)))
    p0 = host(ts0.dit.params)
    upd = [[x - x0 for x, x0 in zip(r[1], p0, strict=True)] for r in results]
    scale = max(np.abs(u).max() for u in upd[1])
    assert scale > 0                                                              # the adapters moved
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(*upd, strict=True)) <= 1e-4 * scale


@needs8
def test_gather_trained_gathers_the_trained_weights_once_with_the_same_update():
    """`gather_trained` (`mesh.gather_trained`): the AR update (2 micro-batches, beta > 0) constrains every
    fsdp-split trained weight to a sharding without `fsdp` once, before its micro-batch scan, keeps the gradient
    accumulators split like the params, and gives the update without it (float32 rounding). Both policies share
    that scan (`train_step._accumulate`); the DiT's path runs in tests/test_train_sharded.py's 4-device trainer
    run, which equals the one-device run."""
    spec0, ts0, batch, ref = ar_case()
    mesh = S.make_mesh(MESHES["data2_fsdp4"])
    split = [x for x in jax.tree.leaves(S.shard_train_state(copy_tree(ts0), mesh).ar.params)
             if "fsdp" in str(x.sharding.spec)]
    assert len(split) > 5
    shapes = {tuple(x.shape) for x in split}
    sharded_ref = S.place(ref, S.param_shardings(ref, mesh))
    results = []
    for gather in (False, True):
        spec = T.ArSpec(spec0.graphdef, spec0.tx,
                        dataclasses.replace(spec0.loss, micro_batch=4, gather_trained=gather))
        ts = S.shard_train_state(copy_tree(ts0), mesh)
        traced = partial(T.ar_update_step, spec, ts, batch, sharded_ref)
        with jax.set_mesh(mesh):
            n, acc = gathered_outside_loops(shapes, traced), split_constraints_in_loops(shapes, traced)
        if gather:
            assert n >= len(split) and acc >= len(split), (n, acc)
        else:
            assert n < len(split), n
        ts, m = S.ShardedUpdate("ar", spec, mesh, ts).update(ts, batch, ref)
        results.append((float(m["loss"]), float(m["grad_norm"]), host(ts.ar.params)))
    p0 = host(ts0.ar.params)
    upd = [[x - x0 for x, x0 in zip(r[2], p0, strict=True)] for r in results]
    scale = max(np.abs(u).max() for u in upd[0])
    assert scale > 1e-4                                                            # the params moved
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(*upd, strict=True)) <= 1e-4 * scale


# -------------------------------------------------------------------------------------------- mesh, rules


def test_mesh_config_fills_and_names_the_bad_field():
    assert S.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.mesh_shape({"data": 1, "fsdp": -1}, 6) == {"data": 1, "fsdp": 6, "tensor": 1}
    assert S.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    for cfg, field in [({"data": -1, "fsdp": 3}, r"mesh\.fsdp=3"), ({"data": -1, "fsdp": -1}, r"mesh\.fsdp=-1"),
                       ({"data": 2, "fsdp": 2, "tensor": 1}, r"mesh\.fsdp=2"), ({"pipeline": 2}, r"mesh\.pipeline"),
                       ({"data": 0}, r"mesh\.data=0"), ({"data": -1, "tensor": 16}, r"mesh\.tensor=16")]:
        with pytest.raises(ValueError, match=field) as e:
            S.mesh_shape(cfg, 8)
        assert "\n" not in str(e.value)


def spec_of(shardings, path: str) -> PartitionSpec:
    flat = {S.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return flat[path].spec


# expected specs of the tiny AR / DiT params: (mesh, path) -> PartitionSpec
AR_SPECS = {
    "data2_fsdp2_tensor2": {
        "lm_head.kernel": P("fsdp", "tensor"),                          # (embed 128, vocab 130)
        "text.embed_tokens.embedding": P("tensor", "fsdp"),             # (vocab 400, embed 128)
        "text.layers.0.mlp.gate_up_proj.kernel": P("fsdp"),             # fused [gate | up]: mlp not on tensor
        "text.layers.0.mlp.down_proj.kernel": P("tensor", "fsdp"),      # (mlp 192, embed 128)
        "text.layers.0.self_attn.k_proj.kernel": P("fsdp", "tensor"),
        "text.layers.0.self_attn.k_proj.bias": P("tensor"),
        "text.layers.0.input_layernorm.weight": P("fsdp"),
        "visual.blocks.0.attn.qkv.kernel": P("fsdp"),                   # (embed, qkv): qkv replicated
        "visual.patch_embed.proj.kernel": P(None, None, None, "fsdp"),  # (conv_h, conv_w, conv_in, embed)
        "visual.embeddings.position_embedding.embedding": P(None, "fsdp"),
        "vqmodel.quantize.embedding.embedding": P(),                    # (codebook, latent)
    },
    "fsdp8": {
        "lm_head.kernel": P("fsdp"),
        "text.embed_tokens.embedding": P(None, "fsdp"),
        "text.layers.0.mlp.gate_up_proj.kernel": P("fsdp"),
        "text.layers.0.mlp.down_proj.kernel": P(None, "fsdp"),
        "text.layers.0.self_attn.k_proj.bias": P(),                     # tensor axis of size 1: dropped
        "visual.patch_embed.proj.kernel": P(None, None, None, "fsdp"),
    },
}


def abstract(slot: str):
    return nnx.eval_shape(lambda: build(slot, 0)[1])


@needs8
def test_param_shardings_follow_the_rules():
    """Specs of real params by hand from the rules; optimizer moments follow their params; odd sizes fall back
    to the divisible prefix of their mesh axes (or replicate); a mesh axis is used once per array."""
    ar = abstract(AR_SLOT)
    for name, specs in AR_SPECS.items():
        sh = S.param_shardings(ar, S.make_mesh(MESHES[name]))
        for path, want in specs.items():
            assert spec_of(sh, path) == want, (name, path, spec_of(sh, path), want)
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    dit_sh = S.param_shardings(abstract(DIT_SLOT), S.make_mesh(MESHES["fsdp8"]))
    assert spec_of(dit_sh, "transformer_blocks.0.norm1.linear.kernel") == P(None, "fsdp")   # (time 32, embed 384)
    assert spec_of(dit_sh, "transformer_blocks.0.attn1.to_q.kernel") == P("fsdp")           # (embed 32, heads 32)
    # optimizer state: mu / nu of the fused kernel carry its spec
    _, policy = T.init_policy(build(AR_SLOT, 0)[1], tx(), T.ar_trainable)
    flat = jax.tree_util.tree_flatten_with_path(S.tree_shardings(policy, mesh))[0]
    gate = [s.spec for p, s in flat if S.path_str(p).endswith("gate_up_proj.kernel")]
    assert len(gate) == 3 and all(s == P("fsdp") for s in gate)      # params, mu, nu
    from glm_jax.ema import ema_init
    ema_sh = S.tree_shardings(ema_init(policy.params), mesh)             # EMA / reference copies too
    assert spec_of(ema_sh, "text.layers.0.mlp.down_proj.kernel") == P("tensor", "fsdp")
    # odd sizes
    odd = nnx.eval_shape(lambda: {"a": nnx.Param(jnp.zeros((12, 10)), axes=("embed", "mlp")),
                                  "b": nnx.Param(jnp.zeros((12, 9)), axes=("embed", "mlp")),
                                  "c": nnx.Param(jnp.zeros((8, 6)), axes=("mlp", "embed"))})
    sh8 = S.tree_shardings(nnx.State(odd), S.make_mesh(MESHES["fsdp8"]))
    assert sh8["a"].spec == P() and sh8["c"].spec == P()
    sh = S.tree_shardings(nnx.State(odd), mesh)
    assert (sh["a"].spec, sh["b"].spec, sh["c"].spec) == (P("fsdp", "tensor"), P("fsdp"), P("tensor", "fsdp"))
    same = S.make_rules({"mlp": "fsdp"})
    assert S.logical_spec(("embed", "mlp"), (128, 192), mesh, same) == P("fsdp")
    m24 = S.make_mesh(MESHES["data2_fsdp4"])
    assert S.batch_spec((8, 5), 0, m24) == P(("data", "fsdp"))
    assert S.batch_spec((6, 5), 0, m24) == P("data")
    assert S.batch_spec((1, 5), 0, m24) == P()
    assert S.batch_spec((3, 8, 5), 1, m24) == P(None, ("data", "fsdp"))


@needs8
def test_fused_gate_up_kernel_keeps_gate_and_up_together():
    """On a tensor-parallel mesh every device holds whole [gate | up] column blocks of the fused AR MLP kernel
    (all 2 * intermediate columns for its rows), while the down projection is split over `tensor`; the update
    on that mesh equals the one-device update (test_update_is_the_same_on_every_mesh)."""
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    cfg, module = build(AR_SLOT, 0)
    _, policy = T.init_policy(module, tx(), T.ar_trainable)
    ts = S.shard_train_state(T.init_train_state(jax.random.key(0), ar=policy), mesh)
    mlp = ts.ar.params["text"]["layers"][0]["mlp"]
    inter = cfg.text.intermediate_size
    for s in mlp["gate_up_proj"]["kernel"].get_value().addressable_shards:
        assert s.data.shape == (cfg.text.hidden_size // 2, 2 * inter)
    for s in mlp["down_proj"]["kernel"].get_value().addressable_shards:
        assert s.data.shape == (inter // 2, cfg.text.hidden_size // 2)


@needs8
def test_batch_cache_and_activation_shardings():
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    _, _, batch, _ = reference("ar")[:4]
    sh = S.batch_shardings(batch, mesh)
    assert sh.input_ids.spec == P(("data", "fsdp")) and sh.position_ids.spec == P(None, ("data", "fsdp"))
    assert sh.old_logprobs is None and sh.advantages.spec == P(("data", "fsdp"))
    placed = S.shard_batch(batch, mesh)
    assert {s.data.shape[0] for s in placed.tokens.addressable_shards} == {B // 4}
    half = S.select_rows(batch, slice(4, 8))
    np.testing.assert_array_equal(half.position_ids, np.asarray(batch.position_ids)[:, 4:8])
    _, _, dbatch, _ = dit_case()
    dsh = S.batch_shardings(dbatch, mesh)
    assert dsh.x.spec == P(("data", "fsdp")) and dsh.cond.glyph_BTD.spec == P(("data", "fsdp"))
    assert dsh.sched[0].spec == P() and dsh.noise_level.spec == P()
    from glm_jax.models.ar import KVCache
    kv = jax.ShapeDtypeStruct((B, 2, 128, 32), jnp.float32)
    cache = KVCache(k=(kv, kv), v=(kv, kv), valid=jax.ShapeDtypeStruct((B, 128), bool))
    csh = S.kv_cache_shardings(cache, mesh)
    assert csh.k[1].spec == P(("data", "fsdp"), "tensor") and csh.valid.spec == P(("data", "fsdp"))
    x = jnp.ones((B, 6, 4))
    y = S.sharded_jit(lambda a: S.constrain(a * 2, ("batch", None, "mlp")), mesh)(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    # activations: the model width never takes `fsdp` (gathered weights, batch-split activations)
    y = S.sharded_jit(lambda a: S.constrain(a[:1] * 2, ("batch", "length", "embed")), mesh)(x)
    assert y.sharding.is_fully_replicated
    assert S.constrain(x, ("batch", None, None)) is x        # no mesh set: identity


# ------------------------------------------------------------------------------------------------ loading


def write_torch_dir(path: str, slot: str, module, hf: dict, max_shard_size: int) -> dict[str, np.ndarray]:
    """A torch-layout component directory (config.json + safetensors shards + index) of `module`'s params,
    named and laid out by the key table; returns the torch state dict."""
    from conversion.apply import torch_state_dict
    from conversion.safetensors_io import PendingTensor, write_sharded
    sd = torch_state_dict(module, COMPONENTS[slot].rules())
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    write_sharded(path, COMPONENTS[slot].weights_stem,
                  [PendingTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in sd.items()], max_shard_size)
    return sd


def flat_params(module) -> dict[str, jax.Array]:
    return {S.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@needs8
def test_torch_directory_loads_straight_into_shardings(tmp_path):
    """A torch-layout AR directory (3 safetensors shards + index; LINEAR and CONV transforms) loads on the
    2 x 2 x 2 mesh with the plain load's values and the rule shardings, reading each distinct slice once: in one
    process holding every device, the bytes read add up to the checkpoint exactly, and a kernel split 4 ways
    is read as 4 quarter slices."""
    from conversion.apply import load_state_dict_into
    from glm_jax.sharded_load import load_torch_sharded, module_shardings
    hf = tiny_ar_config()
    hf["text_config"]["num_hidden_layers"] = 1
    _, src = build(AR_SLOT, 3)
    sd = write_torch_dir(str(tmp_path / "ar"), AR_SLOT, src, hf, max_shard_size=200_000)
    assert len([f for f in os.listdir(tmp_path / "ar") if f.endswith(".safetensors")]) >= 3
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    reads = []
    _, got = load_torch_sharded(str(tmp_path / "ar"), mesh, reads=reads)
    plain = load_state_dict_into(build(AR_SLOT, 4)[1], sd, COMPONENTS[AR_SLOT].rules())
    got_p, want_p, want_sh = flat_params(got), flat_params(plain), module_shardings(got, mesh)
    assert set(got_p) == set(want_p)
    for p, x in got_p.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want_p[p]), err_msg=p)
        assert x.sharding == want_sh[p], p
    assert got_p["text.layers.0.mlp.gate_up_proj.kernel"].sharding.spec == P("fsdp")
    assert got_p["visual.patch_embed.proj.kernel"].sharding.spec == P(None, None, None, "fsdp")   # CONV
    keys = [(r.key, r.index) for r in reads]
    assert len(keys) == len(set(keys))
    assert sum(r.nbytes for r in reads) == sum(v.nbytes for v in sd.values())
    q = [r for r in reads if r.key == "model.language_model.layers.0.self_attn.q_proj.weight"]
    assert len(q) == 4 and all(r.nbytes * 4 == sd[q[0].key].nbytes for r in q)


@needs8
def test_glm_jax_checkpoint_restores_straight_into_shardings(tmp_path):
    from glm_jax.checkpoint import MANIFEST, load_model, save_params
    from glm_jax.sharded_load import load_checkpoint_sharded, module_shardings
    hf = dict(tiny_dit_config(), num_layers=1)
    _, src = build(DIT_SLOT, 5)
    ckpt = tmp_path / "ckpt"
    os.makedirs(ckpt / DIT_SLOT)
    (ckpt / MANIFEST).write_text(json.dumps({"format_version": 1, "components": {
        DIT_SLOT: {"class": "GlmImageTransformer2DModel"}}}))
    (ckpt / DIT_SLOT / "config.json").write_text(json.dumps(hf))
    save_params(str(ckpt / DIT_SLOT / "params"), {k: np.asarray(v) for k, v in flat_params(src).items()})
    mesh = S.make_mesh(MESHES["fsdp8"])
    _, got = load_checkpoint_sharded(str(ckpt), DIT_SLOT, mesh)
    _, plain = load_model(str(ckpt), DIT_SLOT)
    got_p, want_p, want_sh = flat_params(got), flat_params(plain), module_shardings(got, mesh)
    assert set(got_p) == set(want_p)
    for p, x in got_p.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want_p[p]), err_msg=p)
        assert x.sharding == want_sh[p], p
    assert not got_p["transformer_blocks.0.ff.proj_in.kernel"].sharding.is_fully_replicated


# ------------------------------------------------------------------------------------------------ rollouts


@needs8
def test_rollouts_split_over_the_batch_axes_and_match_one_device():
    """AR sampling, the DiT SDE group rollout and the VAE decode under a mesh: each device computes its own
    rows (outputs split over `data x fsdp`), and tokens, latents and images are the one-device ones."""
    from glm_jax.grpo import rollout as R
    from glm_jax.pipeline import GlmImageStack, ar_prompts_from_batch, glyph_conditions
    from glm_jax.sampling.ar_sampler import SamplingParams
    from glm_jax.tiny import tiny_checkpoint
    ckpt = tiny_checkpoint(seed=3)
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    prompts = ['a "red" cat', "a blue dog", "green hills", 'the word "OK"']
    cfg = R.DitRolloutConfig(group_size=2, num_steps=4, sde_window=1)

    def run(stack, ctx):
        with ctx:
            arp = ar_prompts_from_batch(stack.prompts.build_t2i(prompts, H, W))
            glyph, neg = glyph_conditions(stack.t5, prompts, negative=False)
            tokens, _ = R.sample_group_tokens(stack.ar, arp.repeat(2), jax.random.key(0), np.arange(8),
                                              SamplingParams(top_k=stack.n_codes), n_codes=stack.n_codes,
                                              eos_id=stack.eos_id)
            roll = R.dit_group_rollout(stack.dit, stack.vae, tokens[::2], arp.layout, glyph, neg,
                                       jax.random.key(1), cfg, stack.schedule(4, H, W), height=H, width=W)
        return tokens, roll

    tok_m, roll_m = run(GlmImageStack.load(ckpt, mesh=mesh), jax.set_mesh(mesh))
    import contextlib
    tok_1, roll_1 = run(GlmImageStack.load(ckpt), contextlib.nullcontext())
    for x in (tok_m, roll_m.x, roll_m.latents, roll_m.logprobs, roll_m.images):
        assert x.sharding.spec[0] == ("data", "fsdp"), x.sharding
        assert {s.data.shape[0] for s in x.addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(tok_m), np.asarray(tok_1))
    np.testing.assert_allclose(np.asarray(roll_m.latents), np.asarray(roll_1.latents), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(roll_m.logprobs), np.asarray(roll_1.logprobs), rtol=1e-4, atol=1e-3)
    diff = np.abs(np.asarray(roll_m.images).astype(int) - np.asarray(roll_1.images).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@needs8
def test_decode_weights_are_gathered_over_fsdp_only():
    """`gather_weights` (the AR sampler's weights before its decode loop) drops `fsdp` from every param's
    sharding and keeps the `tensor` splits; sampling with and without it gives the same tokens."""
    from glm_jax.grpo import rollout as R
    from glm_jax.pipeline import GlmImageStack, ar_prompts_from_batch
    from glm_jax.sampling.ar_sampler import SamplingParams
    from glm_jax.tiny import tiny_checkpoint
    mesh = S.make_mesh(MESHES["data2_fsdp2_tensor2"])
    stack = GlmImageStack.load(tiny_checkpoint(seed=3), mesh=mesh)
    _, state = stack.ar
    with jax.set_mesh(mesh):
        gathered = jax.jit(S.gather_weights)(state)
    before = {S.path_str(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    after = {S.path_str(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    assert before["text.layers.0.mlp.down_proj.kernel.value"] == P("tensor", "fsdp")
    assert without_fsdp(after["text.layers.0.mlp.down_proj.kernel.value"]) == (("tensor",),)
    assert without_fsdp(after["lm_head.kernel.value"]) == ((), ("tensor",))
    n_fsdp = sum("fsdp" in str(spec) for spec in before.values())
    assert n_fsdp > 10
    for path, spec in before.items():
        assert without_fsdp(after[path]) == without_fsdp(spec) and "fsdp" not in str(after[path]), path
    arp = ar_prompts_from_batch(stack.prompts.build_t2i(["a red cat", 'the word "OK"'], H, W)).repeat(4)
    with jax.set_mesh(mesh):
        toks = [R.sample_group_tokens(stack.ar, arp, jax.random.key(0), np.arange(8), SamplingParams(top_k=stack.n_codes),
                                      n_codes=stack.n_codes, eos_id=stack.eos_id, gather=g)[0] for g in (True, False)]
    np.testing.assert_array_equal(np.asarray(toks[0]), np.asarray(toks[1]))


def gathered_outside_loops(shapes: set, fn, dtypes: set | None = None) -> int:
    """How many sharding constraints without `fsdp` the program of `fn()` applies, outside any loop, to arrays
    of the given shapes (those of fsdp-split weights): the weights gathered once before a loop. `dtypes` (a set)
    gets the dtypes of the arrays so gathered."""
    count = 0

    def walk(jaxpr):
        nonlocal count
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                if tuple(eqn.invars[0].aval.shape) in shapes and "fsdp" not in str(eqn.params["sharding"].spec):
                    count += 1
                    if dtypes is not None:
                        dtypes.add(jnp.dtype(eqn.invars[0].aval.dtype))
            elif eqn.primitive.name not in ("while", "scan"):
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
    walk(jax.make_jaxpr(fn)().jaxpr)
    return count


def split_constraints_in_loops(shapes: set, fn) -> int:
    """How many sharding constraints with `fsdp` the program of `fn()` applies inside loops to arrays of the given
    shapes: gradient accumulators kept split like the params while their addends are gathered."""
    count = 0

    def walk(jaxpr, in_loop):
        nonlocal count
        for eqn in jaxpr.eqns:
            if (eqn.primitive.name == "sharding_constraint" and in_loop
                    and tuple(eqn.invars[0].aval.shape) in shapes and "fsdp" in str(eqn.params["sharding"].spec)):
                count += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, in_loop or eqn.primitive.name in ("while", "scan"))
    walk(jax.make_jaxpr(fn)().jaxpr, False)
    return count


@needs8
def test_dit_sampling_loops_gather_the_weights_once():
    """The DiT's SDE rollout and ODE render under an fsdp mesh constrain every fsdp-split DiT weight to a sharding
    without `fsdp` before their sampling loop (`gather=True`, `mesh.gather_dit`), and not with it off. With float32
    weights and bfloat16 compute they gather the weights' bfloat16 copy (`layers.cast_for_compute`)."""
    from glm_jax.grpo import rollout as R
    from glm_jax.pipeline import GlmImageStack, ar_prompts_from_batch, glyph_conditions
    from glm_jax.tiny import tiny_checkpoint
    mesh = S.make_mesh(MESHES["data2_fsdp4"])
    stack = GlmImageStack.load(tiny_checkpoint(seed=3), mesh=mesh, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    split = [x for x in jax.tree.leaves(stack.dit[1]) if "fsdp" in str(x.sharding.spec)]
    assert {x.dtype for x in split} == {jnp.dtype(jnp.float32)}
    assert len(split) > 10
    split_shapes = {tuple(x.shape) for x in split}
    prompts = ["a red cat", 'the word "OK"']
    arp = ar_prompts_from_batch(stack.prompts.build_t2i(prompts, H, W))
    glyph, neg = glyph_conditions(stack.t5, prompts, negative=False)
    tokens = jnp.zeros((2, arp.layout.n_tokens), jnp.int32)

    for gather in (True, False):
        cfg = R.DitRolloutConfig(group_size=2, num_steps=4, sde_window=1, gather_weights=gather)
        sde = partial(R.dit_group_rollout, stack.dit, stack.vae, tokens, arp.layout, glyph, neg, jax.random.key(1),
                      cfg, stack.schedule(4, H, W), height=H, width=W)
        ode = partial(R.render_tokens, stack.dit, stack.vae, jnp.repeat(tokens, 2, axis=0), arp.layout,
                      jnp.repeat(glyph, 2, axis=0), None, jax.random.key(2), jnp.arange(4), stack.schedule(3, H, W),
                      height=H, width=W, guidance=1.0, gather=gather)
        dtypes = set()
        with jax.set_mesh(mesh):
            n_sde, n_ode = (gathered_outside_loops(split_shapes, f, dtypes) for f in (sde, ode))
        if gather:
            assert n_sde >= len(split) and n_ode >= len(split), (n_sde, n_ode, len(split))
            assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes
        else:
            assert n_sde == 0 and n_ode == 0, (n_sde, n_ode)


@needs8
def test_pallas_decode_attention_runs_per_device():
    """The AR's Pallas decode-attention kernel (interpreted on CPU) under a batch-split mesh runs in a
    `shard_map` on each device's rows (XLA cannot partition a Pallas call) and samples the tokens of the einsum
    form."""
    from glm_jax.grpo import rollout as R
    from glm_jax.pipeline import GlmImageStack, ar_prompts_from_batch
    from glm_jax.sampling.ar_sampler import SamplingParams
    from glm_jax.tiny import tiny_checkpoint
    mesh = S.make_mesh(MESHES["data2_fsdp4"])
    stack = GlmImageStack.load(tiny_checkpoint(seed=3), mesh=mesh)
    model = nnx.merge(*stack.ar)
    for layer in model.text.layers:
        layer.self_attn.decode_attention = "pallas"
    pallas_ar = nnx.split(model)
    arp = ar_prompts_from_batch(stack.prompts.build_t2i(["a red cat", 'the word "OK"'], H, W)).repeat(4)
    sampling = SamplingParams(top_k=stack.n_codes)

    def sample(ar):
        return R.sample_group_tokens(ar, arp, jax.random.key(0), np.arange(8), sampling, n_codes=stack.n_codes,
                                     eos_id=stack.eos_id)

    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(sample)(pallas_ar))
        tok_p, lp_p = sample(pallas_ar)
        tok_e, lp_e = sample(stack.ar)
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
    assert tok_p.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(tok_p), np.asarray(tok_e))
    np.testing.assert_allclose(np.asarray(lp_p), np.asarray(lp_e), rtol=1e-5, atol=1e-5)


def without_fsdp(spec: PartitionSpec) -> tuple:
    """The mesh axes of each dimension of `spec` other than `fsdp`, trailing empty dimensions dropped."""
    out = [tuple(a for a in ((d,) if isinstance(d, str) else (d or ())) if a != "fsdp") for d in spec]
    while out and not out[-1]:
        out.pop()
    return tuple(out)


@needs8
def test_reward_set_on_several_devices_scores_as_one_call():
    """A process driving several devices scores its images on all of them (`RewardSet.on_devices`: blocks of
    rows, one thread per device): the same scores as one call, for rewards with targets, sources and none."""
    from glm_jax.rewards import RewardContext, build_reward_sets
    rng = np.random.default_rng(4)
    n = 7                                                                   # uneven blocks over 4 devices
    images = rng.integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)
    targets = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) if i % 3 else
               rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) for i in range(n)]      # mixed target sizes
    sources = [np.clip(im.astype(int) + rng.integers(-40, 40, im.shape), 0, 255).astype(np.uint8) for im in images]
    rewards = build_reward_sets({"dit": {"ssim": 1.0, "structure": 0.5, "aesthetic_heuristic": 0.25}})["dit"]
    ctx = RewardContext.make([f"p{i}" for i in range(n)], targets=targets, sources=sources)
    one = rewards(images, ctx)
    split = rewards.on_devices(images, ctx, jax.devices()[:4])
    for name in one.components:
        np.testing.assert_allclose(split.components[name], one.components[name], rtol=1e-6, atol=1e-7)
        assert split.metrics[f"{name}/mean"] == pytest.approx(one.metrics[f"{name}/mean"], rel=1e-6)
    np.testing.assert_allclose(split.total, one.total, rtol=1e-6, atol=1e-7)
    assert np.ptp(one.total) > 0.01                                          # the samples score differently


@needs8
def test_dit_and_ar_kernels_run_per_device_under_a_mesh(monkeypatch):
    """The DiT ops' and the AR MLP's Pallas kernels under a mesh that splits the samples run per device
    (`shard_map`; XLA does not partition a Pallas call): a sub-layer built from the four DiT ops and a gated MLP
    gives the gradients of the one-device plain-JAX formulas. The kernels run in Pallas' interpreter here
    (`GLM_JAX_DIT_KERNELS=interpret`, `GLM_JAX_AR_KERNELS=interpret`)."""
    from glm_jax.models import ar_ops, dit_ops
    b, length, d, k, f, t = 8, 48, 256, 64, 512, 16
    r = np.random.default_rng(0)
    a = lambda *s, sc=1.0: jnp.asarray(r.standard_normal(s) * sc, jnp.float32)
    ang = a(length, k // 2)
    cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))
    batched = dict(x=a(b, length, d) + 0.5, shift=a(b, 2, d, sc=0.3), scale=a(b, 2, d, sc=0.3), gate=a(b, 2, d),
                   cot=a(b, length, d))
    params = dict(bq=a(d, sc=0.3), w1=a(d, f, sc=d ** -0.5), b1=a(f, sc=0.3), w2=a(f, d, sc=f ** -0.5),
                  b2=a(d, sc=0.3), wg=a(d, 128, sc=d ** -0.5), wd=a(64, d, sc=0.125))

    def loss(params, v):
        u, xr = dit_ops.modulate_split(v["x"], v["shift"], v["scale"], t)
        y = dit_ops.qk_norm_rope(u, params["bq"], cos, sin)
        h = dit_ops.bias_gelu(y @ params["w1"], params["b1"])
        out = dit_ops.gated_residual(xr, h @ params["w2"], params["b2"], v["gate"], t)
        out = out + ar_ops.gated_activation(out @ params["wg"], jax.nn.silu) @ params["wd"]
        return jnp.vdot(out, v["cot"])

    grad = jax.grad(loss, argnums=(0, 1))
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "0")
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "0")
    ref = jax.jit(grad)(params, batched)

    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    split = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    v_sharded = {n: jax.device_put(x, split) for n, x in batched.items()}
    with jax.set_mesh(mesh):
        assert "pallas_call" in str(jax.make_jaxpr(grad)(params, v_sharded))
        mlp = jax.grad(lambda w, x: jnp.sum(ar_ops.gated_activation(x @ w, jax.nn.silu)))
        assert "pallas_call" in str(jax.make_jaxpr(mlp)(params["wg"], v_sharded["x"]))
        got = jax.jit(grad)(params, v_sharded)
    assert got[1]["x"].sharding.spec[0] is not None          # the input gradient stays split by samples
    for path, want in jax.tree_util.tree_leaves_with_path(ref):
        have = dict(jax.tree_util.tree_leaves_with_path(got))[path]
        err = float(jnp.max(jnp.abs(have - want)) / jnp.max(jnp.abs(want)))
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


@needs8
def test_decode_norm_kernel_runs_per_device_under_a_mesh(monkeypatch):
    """The AR decode step's fused residual add + RMSNorm (`ar_ops.add_rms_norm`, a Pallas call) on rows split over
    the devices runs per device and gives the one-device plain formulas' values, split as its input."""
    from glm_jax.models import ar_ops
    r = np.random.default_rng(0)
    x, a = (jnp.asarray(r.standard_normal((8, 256)) * s, jnp.float32) for s in (1.0, 3.0))
    w1, w2 = (jnp.asarray(1 + 0.3 * r.standard_normal(256), jnp.float32) for _ in range(2))
    op = lambda: jax.jit(lambda *v: ar_ops.add_rms_norm(*v, 1e-5, 1e-5))   # traced afresh per setting
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "0")
    want = op()(x, a, w1, w2)
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    split = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    xs, as_ = jax.device_put(x, split), jax.device_put(a, split)
    with jax.set_mesh(mesh):
        fn = op()
        assert "shard_map" in str(jax.make_jaxpr(fn)(xs, as_, w1, w2))
        got = fn(xs, as_, w1, w2)
    for g, w in zip(got, want):
        assert g.sharding.spec[0] is not None
        assert rel_err(g, w) < 1e-6


@needs8
def test_dit_padded_stream_under_a_mesh(monkeypatch):
    """A DiT whose stream the fused ops' kernels do not tile (3 glyph + 16 image tokens = 19, padded to 24) under
    a mesh that splits the samples: the padding rows' key mask (`key_value_seq_lengths`, split like the samples)
    and the per-device kernels give the one-device plain-JAX output and gradients (kernels interpreted)."""
    from glm_jax.models.dit import DiTConfig, GlmImageDiT
    hf = dict(tiny_dit_config(), num_layers=1, attention_head_dim=128)
    model = GlmImageDiT(DiTConfig.from_hf(hf), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    b, r = 8, np.random.default_rng(0)
    lat = jnp.asarray(r.standard_normal((b, 8, 8, 16)), jnp.float32)
    args = (jnp.asarray(r.standard_normal((b, 3, hf["text_embed_dim"])), jnp.float32),
            jnp.asarray(r.integers(0, hf["prior_vq_quantizer_codebook_size"], (b, 16)), jnp.int32),
            jnp.zeros((b, 16), bool), jnp.asarray(r.uniform(0, 999, b), jnp.float32),
            jnp.full((b, 2), 64.0, jnp.float32), jnp.zeros((b, 2), jnp.float32))
    cot = jnp.asarray(r.standard_normal(lat.shape), jnp.float32)

    def loss(params, lat, args):
        return jnp.vdot(nnx.merge(graphdef, params)(lat, *args)[0], cot)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "0")
    assert model.padded_length(19) == 19
    ref = jax.jit(grad)(params, lat, args)

    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    split = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        assert model.padded_length(19) == 24
        got = jax.jit(grad)(params, split(lat), jax.tree.map(split, args))
    for path, want in jax.tree_util.tree_leaves_with_path(ref):
        have = dict(jax.tree_util.tree_leaves_with_path(got))[path]
        err = float(jnp.max(jnp.abs(have - want)) / jnp.max(jnp.abs(want)))
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
