"""GRPO update steps and rollouts on the tiny random GLM-Image (CPU, fp32): on-policy ratio 1 and REINFORCE
gradients, rollout log-probs == trainer log-probs, constant groups carry no gradient, gradient accumulation ==
one batch, and a DiT policy and an AR policy that learn a colour reward of their decoded images (while the same
runs at lr 0 do not)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.grpo import optim as O
from glm_jax.grpo import rollout as R
from glm_jax.grpo import train_step as T
from glm_jax.grpo.advantages import compute_advantages
from glm_jax.pipeline import GlmImageStack, ar_prompts_from_ids, glyph_conditions, prior_ids
from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams, score_tokens
from glm_jax.sampling.flow import step_logprob
from glm_jax.sampling.schedule import FlowSchedule
from glm_jax.tiny import tiny_tokenizer
from tests.util import jaxpr_eqns, pytest_in_subprocess

H = W = 64
LAYOUT = ArLayout.t2i(H, W)           # preview 16x16, target 2x2: N = 261
TEXTS = ["a red fox in the snow", "a sign that says 'OK'"]
G = 4                                 # group size of the fixture rollouts (B = 8)
SAMPLING = SamplingParams()           # GLM's 0.9 / 16512 / 0.75


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def tree_rel(a, b) -> float:
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def t2i_ids(text: str, layout: ArLayout) -> list[int]:
    """`{text}<sop>th tw<eop>[<sop>ph pw<eop>]<bos>` in the tiny tokenizer (the t2i prompt layout)."""
    grids = "".join(f"<sop>{h} {w}<eop>" for h, w in reversed(layout.gen_grids))
    return tiny_tokenizer().encode(f"{text}{grids}<|dit_token_16384|>").ids


def make_prompts(stack, texts, layout):
    ar_cfg = stack.ar.merge().cfg
    grids = [[1, *g] for g in reversed(layout.gen_grids)]
    return ar_prompts_from_ids([t2i_ids(t, layout) for t in texts], [grids] * len(texts), layout, ar_cfg)


@pytest.fixture(scope="module")
def stack():
    return GlmImageStack.tiny(0)


@pytest.fixture(scope="module")
def prompts(stack):
    return make_prompts(stack, TEXTS, LAYOUT)


@pytest.fixture(scope="module")
def glyph(stack):
    return glyph_conditions(stack.t5, TEXTS)


@pytest.fixture(scope="module")
def ar_roll(stack, prompts, glyph):
    cfg = R.ArRolloutConfig(group_size=G, sampling=SAMPLING, decode_steps=3, decode_guidance=1.5)
    return R.ar_group_rollout(stack.ar, stack.dit, stack.vae, prompts, *glyph, jax.random.key(0), cfg,
                              stack.schedule(3, H, W), n_codes=stack.n_codes, eos_id=stack.eos_id, height=H,
                              width=W, first_sample_id=16, first_group_id=4)


DIT_CFG = R.DitRolloutConfig(group_size=G, num_steps=6, sde_window=2, guidance=1.5, noise_level=0.7)


@pytest.fixture(scope="module")
def dit_roll(stack, ar_roll, glyph):
    tokens = R.first_of_groups(ar_roll.tokens, G)
    return R.dit_group_rollout(stack.dit, stack.vae, tokens, LAYOUT, *glyph, jax.random.key(1), DIT_CFG,
                               stack.schedule(DIT_CFG.num_steps, H, W), height=H, width=W)


def ar_setup(stack, *, lr=0.0, micro=0, beta=0.0, tx=None, sampling=SAMPLING, eps=1e-8):
    tx = tx or O.make_optimizer(O.OptimConfig(lr=lr, grad_clip=1.0, weight_decay=0.01, eps=eps))
    graphdef, policy = T.init_policy(stack.ar.merge(), tx, T.ar_trainable)
    spec = T.ArSpec(graphdef, tx, T.ArLossConfig(n_codes=stack.n_codes, eos_id=stack.eos_id, sampling=sampling,
                                                 beta=beta, micro_batch=micro, chunk=100))
    return spec, T.init_train_state(jax.random.key(0), ar=policy)


def dit_setup(stack, *, lr=0.0, micro=0, beta=0.0, guidance=1.5, clip=1e-3, eps=1e-8, micro_steps=0):
    tx = O.make_optimizer(O.OptimConfig(lr=lr, grad_clip=1.0, weight_decay=1e-4, eps=eps))
    graphdef, policy = T.init_policy(stack.dit.merge(), tx, T.dit_trainable)
    spec = T.DitSpec(graphdef, tx, T.DitLossConfig(clip_range=clip, beta=beta, guidance=guidance, micro_batch=micro,
                                                   micro_steps=micro_steps))
    return spec, T.init_train_state(jax.random.key(0), dit=policy)


def advantages(n: int, seed: int) -> tuple[jax.Array, jax.Array]:
    r = np.random.default_rng(seed).standard_normal(n)
    a = compute_advantages(r, np.repeat(np.arange(n // G), G))
    return jnp.asarray(a.advantages), jnp.asarray(a.weights)


def perturbed(params, scale: float, seed: int):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------------------------------- glue


def test_prior_ids_upsample_the_target_grid():
    layout = ArLayout.t2i(64, 96)  # target 2x3, preview 13x19
    tok = np.random.default_rng(0).integers(0, 100, (3, layout.n_tokens)).astype(np.int32)
    got = np.asarray(prior_ids(jnp.asarray(tok), layout)).reshape(3, 4, 6)
    target = tok[:, layout.n_preview:layout.n_preview + 6].reshape(3, 2, 3)
    for y in range(4):
        for x in range(6):
            np.testing.assert_array_equal(got[:, y, x], target[:, y // 2, x // 2])


def test_optimizer_schedule_and_fp32_state():
    f = O.lr_schedule(O.OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, final_lr_ratio=0.1))
    np.testing.assert_allclose([float(f(s)) for s in (0, 3, 4, 9, 14, 20)],
                               [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    tx = O.make_optimizer(O.OptimConfig(lr=1e-2))
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    state = tx.init(params)
    assert all(x.dtype != jnp.bfloat16 for x in jax.tree.leaves(state))
    upd, _ = tx.update({"w": jnp.ones((3,), jnp.bfloat16)}, state, params)
    assert upd["w"].dtype == jnp.bfloat16


def test_ar_rollout_groups(ar_roll):
    tok = np.asarray(ar_roll.tokens)
    assert tok.shape == (2 * G, LAYOUT.n_tokens) and ar_roll.images.shape == (2 * G, H, W, 3)
    assert ar_roll.images.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(ar_roll.group_ids), np.repeat([4, 5], G))
    np.testing.assert_array_equal(np.asarray(ar_roll.sample_ids), 16 + np.arange(2 * G))
    for a in range(2 * G):  # unique RNG per sample: no two rows share their preview tokens
        for b in range(a + 1, 2 * G):
            assert np.mean(tok[a, :LAYOUT.n_preview] != tok[b, :LAYOUT.n_preview]) > 0.5
    mask = np.asarray(ar_roll.loss_mask)
    assert mask[:, :-1].all() and not mask[:, -1].any()


def test_dit_rollout_window_and_noise(dit_roll):
    steps = np.asarray(dit_roll.steps)
    assert steps.shape == (2 * G, 2) and np.all(steps == steps[:1])
    w = steps[0, 0]
    assert steps[0, 1] == w + 1 and 0 <= w <= DIT_CFG.num_steps // 2 - 2
    x = np.asarray(dit_roll.x_next).reshape(2 * G, 2, -1)
    for a in range(2 * G):  # unique x_T and per-step noise within and across groups
        for b in range(a + 1, 2 * G):
            assert np.corrcoef(x[a, 1], x[b, 1])[0, 1] < 0.9
    assert np.all(np.isfinite(np.asarray(dit_roll.logprobs)))
    starts = {int(np.argmax(np.asarray(R.sde_step_mask(DIT_CFG, jax.random.key(s))))) for s in range(40)}
    assert starts == {0, 1}  # w ~ U{0 .. N//2 - W} = {0, 1}
    frac = R.DitRolloutConfig(num_steps=6, timestep_fraction=1.0)
    np.testing.assert_array_equal(np.asarray(R.sde_step_mask(frac, jax.random.key(0))), [1, 1, 1, 1, 1, 0])


def test_rollouts_sample_float32_weights_from_an_exact_bfloat16_copy(monkeypatch):
    """With float32 weights and bfloat16 compute (`model.param_dtype=float32`, the default) the samplers work from
    a copy of the layers' weights cast to bfloat16 once (`layers.cast_for_compute`; half the bytes to gather and
    to read at every step), with the norms' weights left in float32: the AR rollout's tokens and log-probs and
    the DiT ODE's latents equal, bit for bit, those of sampling from the float32 weights themselves (the DiT's SDE
    rollout and render share the rollout's `_sampler` with the AR; under a mesh, tests/test_sharding.py checks that
    they gather the bfloat16 copy); and every sampling loop, the trainer's and the inference ones, reads only
    bfloat16 weight matrices (their traced programs)."""
    from glm_jax.models.layers import cast_for_compute
    from glm_jax.pipeline import sched_arrays
    from glm_jax.sampling import ar_sampler, flow
    from glm_jax.sampling.ar_sampler import sample_ar
    stack = GlmImageStack.tiny(0, dtype=jnp.bfloat16)
    ar = cast_for_compute(stack.ar.merge())
    assert ar.text.layers[0].mlp.down_proj.kernel.dtype == jnp.bfloat16
    assert ar.lm_head.kernel.dtype == jnp.bfloat16 and ar.text.embed_tokens.embedding.dtype == jnp.bfloat16
    assert ar.text.layers[0].input_layernorm.weight.dtype == jnp.float32       # RMSNorm: left as stored
    assert ar.visual.blocks[0].norm1.weight.dtype == jnp.float32               # LayerNorm applies it in float32
    assert {x.dtype for x in jax.tree.leaves(nnx.state(cast_for_compute(stack.dit.merge())))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(stack.dit[1])} == {jnp.dtype(jnp.float32)}  # the stack's own untouched
    prompts = make_prompts(stack, TEXTS[:1], LAYOUT).repeat(2)
    glyph, _ = glyph_conditions(stack.t5, TEXTS[:1])

    def sample():
        jax.clear_caches()
        tokens, lps = R.sample_group_tokens(stack.ar, prompts, jax.random.key(0), jnp.arange(2), SAMPLING,
                                            n_codes=stack.n_codes, eos_id=stack.eos_id)
        x_T = flow.initial_latents(jax.random.key(3), jnp.arange(2), flow.latent_shape(H, W))
        cond = flow.make_cond(jnp.repeat(glyph, 2, axis=0), prior_ids(tokens, LAYOUT), H, W)
        ode = flow.ode_sample_jit(stack.dit.merge(), x_T, cond, stack.schedule(2, H, W))
        return [np.asarray(x) for x in (tokens, lps, ode)]

    x_T = flow.initial_latents(jax.random.key(3), jnp.arange(2), flow.latent_shape(H, W))
    cond = flow.make_cond(jnp.repeat(glyph, 2, axis=0), prior_ids(jnp.zeros((2, LAYOUT.n_tokens), jnp.int32), LAYOUT),
                          H, W)
    samplers = {   # every sampling loop over a trained model, traced only
        "rollout AR": lambda: R.sample_group_tokens(stack.ar, prompts, jax.random.key(0), jnp.arange(2), SAMPLING,
                                                    n_codes=stack.n_codes, eos_id=stack.eos_id),
        "rollout DiT SDE": lambda: R._sde_jit(*stack.dit, x_T, cond, sched_arrays(stack.schedule(2, H, W)),
                                              jax.random.key(1), jnp.arange(2), 0.7, jnp.ones(2, bool),
                                              guidance=1.0, kernel="sde", num_sde=2),
        "sample_ar": lambda: sample_ar(*stack.ar, *(jnp.asarray(a) for a in prompts.arrays()), jax.random.key(2),
                                       SAMPLING, n_codes=stack.n_codes, eos_id=stack.eos_id, layout=LAYOUT),
        "ode_sample_jit": lambda: flow.ode_sample_jit(stack.dit.merge(), x_T, cond, stack.schedule(2, H, W)),
        "sde_sample_jit": lambda: flow.sde_sample_jit(stack.dit.merge(), x_T, cond, stack.schedule(2, H, W),
                                                      jax.random.key(1), jnp.arange(2)),
    }
    for name, fn in samplers.items():
        assert loop_weight_dtypes(stack, fn) == {jnp.dtype(jnp.bfloat16)}, name

    copied = sample()
    for module in (R, flow, ar_sampler):
        monkeypatch.setattr(module, "cast_for_compute", lambda model: model)
    direct = sample()
    assert copied[1].dtype == np.float32 and np.isfinite(copied[1]).all() and np.isfinite(copied[2]).all()
    for a, b in zip(copied, direct, strict=True):
        np.testing.assert_array_equal(a, b)
    assert jnp.dtype(jnp.float32) in loop_weight_dtypes(stack, samplers["sample_ar"])   # the check can fail


def loop_weight_dtypes(stack, fn) -> set:
    """The dtypes of the arrays with the shape of an AR or DiT weight matrix that enter a loop (`scan`, `while`)
    in the program of `fn()`: the weights a sampling loop reads at every step."""
    shapes = {tuple(x.shape) for x in jax.tree.leaves((stack.ar[1], stack.dit[1])) if x.ndim >= 2}
    return {jnp.dtype(v.aval.dtype) for eqn in jaxpr_eqns(jax.make_jaxpr(fn)().jaxpr)
            if eqn.primitive.name in ("scan", "while")
            for v in eqn.invars if hasattr(v.aval, "shape") and tuple(v.aval.shape) in shapes}


# -------------------------------------------------------------------------------- rollout lp == trainer lp


def test_ar_rollout_logprobs_equal_trainer_logprobs(stack, ar_roll):
    a, w = advantages(2 * G, 0)
    batch = R.ar_batch(ar_roll, a, w)
    for micro in (0, 2):
        spec, ts = ar_setup(stack, micro=micro)
        lp = np.asarray(T.ar_old_logprobs_jit(spec, ts, batch))
        err = np.abs(lp - np.asarray(ar_roll.logprobs))[:, :-1].max()
        assert err <= 1e-5, (micro, err)


def test_dit_rollout_logprobs_equal_replay(stack, dit_roll):
    a, w = advantages(2 * G, 1)
    batch = R.dit_batch(dit_roll, a, w)
    for micro in (0, 2):
        spec, ts = dit_setup(stack, micro=micro)
        lp = np.asarray(T.dit_old_logprobs_jit(spec, ts, batch))
        err = np.abs(lp - np.asarray(dit_roll.logprobs)).max()
        assert err <= 1e-6, (micro, err)
    # stored rollout lp as old lp (Flow-GRPO's path): ratio 1 to 1e-6 on the first pass
    _, metrics = T.dit_grads_jit(spec, ts.dit, R.dit_batch(dit_roll, a, w, old_from_rollout=True))
    assert abs(float(metrics["ratio_min"]) - 1) <= 1e-6 and abs(float(metrics["ratio_max"]) - 1) <= 1e-6


# ------------------------------------------------------------------------------- on-policy == REINFORCE


def test_ar_on_policy_ratio_is_one_and_gradient_is_reinforce(stack, ar_roll):
    a, w = advantages(2 * G, 2)
    w = w.at[1].set(0.5)
    batch = R.ar_batch(ar_roll, a, w)
    spec, ts = ar_setup(stack)
    grads, metrics = T.ar_grads_jit(spec, ts.ar, batch)
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    graphdef, frozen = spec.graphdef, ts.ar.frozen
    mask = jnp.asarray(LAYOUT.loss_mask())

    @jax.jit
    def reinforce(params):
        model = nnx.merge(graphdef, params, frozen)
        s = score_tokens(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.decode_positions,
                         batch.tokens, SAMPLING, n_codes=stack.n_codes, eos_id=stack.eos_id)
        per_seq = jnp.sum(mask * s.logprobs, axis=1) / jnp.sum(mask)
        return -jnp.sum(w * a * per_seq) / jnp.sum(w)

    want = jax.grad(reinforce)(ts.ar.params)
    assert tree_rel(grads, want) < 1e-5
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_dit_on_policy_ratio_is_one_and_gradient_is_reinforce(stack, dit_roll):
    a, w = advantages(2 * G, 3)
    batch = R.dit_batch(dit_roll, a, w)
    spec, ts = dit_setup(stack)
    grads, metrics = T.dit_grads_jit(spec, ts.dit, batch)
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    graphdef, frozen = spec.graphdef, ts.dit.frozen
    sched = FlowSchedule(*dit_roll.sched, mu=0.0)

    @jax.jit
    def reinforce(params):
        dit = nnx.merge(graphdef, params, frozen)
        total = 0.0
        for j in range(batch.steps.shape[1]):
            out = step_logprob(dit, batch.x[:, j], batch.x_next[:, j], batch.steps[:, j], batch.cond, sched,
                               guidance=1.5, noise_level=DIT_CFG.noise_level)
            total = total + jnp.sum(w * a * out.logprob)
        return -total / (jnp.sum(w) * batch.steps.shape[1])

    want = jax.grad(reinforce)(ts.dit.params)
    assert tree_rel(grads, want) < 1e-5


# ----------------------------------------------------------------------------- constant groups, accumulation


def test_constant_reward_group_has_zero_advantage_and_no_gradient(stack, ar_roll, dit_roll):
    rewards = np.concatenate([np.full(G, 0.1), np.random.default_rng(4).standard_normal(G)])
    adv = compute_advantages(rewards, np.repeat([0, 1], G))
    assert np.all(adv.advantages[:G] == 0) and np.all(adv.weights[:G] == 0) and np.all(adv.weights[G:] == 1)
    spec, ts = ar_setup(stack, beta=0.0)
    batch = R.ar_batch(ar_roll, adv.advantages, adv.weights)
    g_full, _ = T.ar_grads_jit(spec, ts.ar, batch)
    other = np.asarray(batch.tokens).copy()
    other[:G] = np.random.default_rng(5).integers(0, 100, other[:G].shape)  # the constant group's data
    g_other, _ = T.ar_grads_jit(spec, ts.ar, batch._replace(tokens=jnp.asarray(other)))
    assert tree_rel(g_other, g_full) < 1e-6
    # a batch of only constant groups: exactly zero gradient (AR and DiT)
    zeros = jnp.zeros(2 * G)
    g0, _ = T.ar_grads_jit(spec, ts.ar, batch._replace(advantages=zeros, weights=zeros))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0))
    dspec, dts = dit_setup(stack)
    g0, _ = T.dit_grads_jit(dspec, dts.dit, R.dit_batch(dit_roll, zeros, zeros))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0))


def test_ar_gradient_accumulation_equals_one_batch(stack, ar_roll):
    """beta > 0 with a reference, off-policy old log-probs (ratios != 1, clipping active): 4 micro-batches of 2
    give the gradient of one batch of 8 (the optimizer step is a function of that gradient)."""
    a, w = advantages(2 * G, 6)
    batch = R.ar_batch(ar_roll, a, w)
    spec1, ts1 = ar_setup(stack, lr=1e-3, beta=0.05, eps=1e-2)
    ref = perturbed(ts1.ar.params, 0.05, 0)
    old_spec = T.ArSpec(spec1.graphdef, spec1.tx, spec1.loss)
    old = T.ar_old_logprobs_jit(old_spec, T.TrainState(ts1.step, ts1.rng, ts1.ar._replace(
        params=perturbed(ts1.ar.params, 0.5, 1))), batch)
    batch = batch._replace(old_logprobs=old)
    spec4, ts4 = ar_setup(stack, lr=1e-3, beta=0.05, micro=2, eps=1e-2)
    g1, m1 = T.ar_grads_jit(spec1, ts1.ar, batch, ref)
    g4, m4 = T.ar_grads_jit(spec4, ts4.ar, batch, ref)
    assert float(m1["clip_frac"]) > 0 and float(m1["kl_loss"]) > 0
    assert tree_rel(g4, g1) < 1e-5
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m4["kl_loss"]), float(m1["kl_loss"]), rtol=1e-5)
    for k in ("clip_frac", "clip_frac_low", "ratio_mean", "kl_mean", "tokens"):   # per-token means: the batch's
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)


def test_dit_gradient_accumulation_equals_one_batch(stack, dit_roll):
    a, w = advantages(2 * G, 7)
    spec1, ts1 = dit_setup(stack, lr=1e-3, beta=0.05, eps=1e-2)
    spec4, ts4 = dit_setup(stack, lr=1e-3, beta=0.05, micro=2, eps=1e-2)
    ref = perturbed(ts1.dit.params, 0.05, 2)
    old = T.dit_old_logprobs_jit(spec1, T.TrainState(ts1.step, ts1.rng, dit=ts1.dit._replace(
        params=perturbed(ts1.dit.params, 0.5, 3))), R.dit_batch(dit_roll, a, w))
    batch = R.dit_batch(dit_roll, a, w)._replace(old_logprobs=old)
    g1, m1 = T.dit_grads_jit(spec1, ts1.dit, batch, ref)
    g4, m4 = T.dit_grads_jit(spec4, ts4.dit, batch, ref)
    assert float(m1["clipfrac"]) > 0 and float(m1["kl_loss"]) > 0
    assert tree_rel(g4, g1) < 1e-5
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
    # one trained step of 2 samples per micro-batch: the J steps of a sample land in different micro-batches
    j = batch.steps.shape[1]
    assert j >= 2
    spec_s, ts_s = dit_setup(stack, lr=1e-3, beta=0.05, micro=2, eps=1e-2, micro_steps=1)
    assert T._dit_n_micro(batch.steps.shape[0], j, spec_s.loss) == 4 * j
    g_s, m_s = T.dit_grads_jit(spec_s, ts_s.dit, batch, ref)
    assert tree_rel(g_s, g1) < 1e-5
    np.testing.assert_allclose(float(m_s["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
    for k in ("clipfrac", "approx_kl", "ratio_mean", "transitions"):   # per-transition means: the batch's
        for m in (m4, m_s):   # (one-step micro-batches hold untrained steps: no transitions at all)
            np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="2 steps does not divide the batch of 8 samples x 3 trained steps"):
        T._dit_n_micro(8, 3, T.DitLossConfig(micro_steps=2))


def test_both_step_updates_each_policy_with_its_own_optimizer(stack, ar_roll, dit_roll):
    a, w = advantages(2 * G, 8)
    ar_spec, ar_ts = ar_setup(stack, lr=0.0)
    dit_spec, dit_ts = dit_setup(stack, lr=1e-3)
    ts = T.init_train_state(jax.random.key(3), ar=ar_ts.ar, dit=dit_ts.dit)
    ar0, dit0 = jax.tree.map(np.asarray, (ts.ar.params, ts.dit.params))
    ts, metrics = T.both_update_jit(ar_spec, dit_spec, ts, R.ar_batch(ar_roll, a, w), R.dit_batch(dit_roll, a, w))
    assert int(ts.step) == 1 and "ar/grad_norm" in metrics and "dit/grad_norm" in metrics
    assert float(metrics["ar/grad_norm"]) > 0
    assert tree_rel(ts.ar.params, ar0) == 0.0       # AR lr 0
    assert tree_rel(ts.dit.params, dit0) > 1e-6     # DiT lr 1e-3


# ------------------------------------------------------------------------------------------------ learning

# The learning curves run 45 and 2 x 40 steps of small programs, which XLA's optimised CPU code runs faster than the
# compile-time setting of the other tests (util.CPU_XLA_FLAGS) does: both tests 141 s -> 90 s in-process, alone
# on 2 cores (98 s with this subprocess).
# `test_learning_curves` runs them in a subprocess with these flags; elsewhere they are skipped.
LEARN_FLAGS = "--xla_backend_optimization_level=2"
IN_LEARN_PROCESS = LEARN_FLAGS in os.environ.get("XLA_FLAGS", "")
learning = pytest.mark.skipif(not IN_LEARN_PROCESS, reason=f"run by test_learning_curves (XLA_FLAGS={LEARN_FLAGS})")


def test_learning_curves():
    """The `learning` tests below, in a subprocess with XLA's optimised CPU code (their output is printed)."""
    if IN_LEARN_PROCESS:
        pytest.skip("this process runs the learning tests themselves")
    out = pytest_in_subprocess(__file__, LEARN_FLAGS, "-q", "-s", "-k", "learns", timeout=900)
    print(out[-3000:])
    assert re.search(r"\b2 passed", out) and "skipped" not in out, out[-2000:]


def colour_reward(images, target=(0.9, 0.2, 0.1)) -> np.ndarray:
    """Minus the distance of the mean image colour (in [0, 1]) to a target colour."""
    m = np.asarray(images, np.float64).mean(axis=(1, 2)) / 255.0
    return -np.sqrt(((m - np.asarray(target)) ** 2).sum(-1))


def rise_z(curve) -> float:
    """(mean of the last 10 - mean of the first 10) / its standard error."""
    f, last = np.asarray(curve[:10]), np.asarray(curve[-10:])
    return float((last.mean() - f.mean()) / np.sqrt(f.var(ddof=1) / 10 + last.var(ddof=1) / 10))


def run_dit(stack, prompts, glyph, lr: float, steps: int):
    cfg = R.DitRolloutConfig(group_size=8, num_steps=4, sde_window=2, guidance=1.0)
    spec, ts = dit_setup(stack, lr=lr, beta=1e-4, guidance=1.0)
    ref = jax.tree.map(jnp.copy, ts.dit.params)  # the update donates ts
    tokens, _ = R.sample_group_tokens(stack.ar, prompts, jax.random.key(7), jnp.arange(2), SAMPLING,
                                      n_codes=stack.n_codes, eos_id=stack.eos_id)
    sched = stack.schedule(4, H, W)
    curve, kls = [], []
    for it in range(steps):
        roll = R.dit_group_rollout((spec.graphdef, (ts.dit.params, ts.dit.frozen)), stack.vae, tokens, LAYOUT,
                                   *glyph, jax.random.key(100 + it), cfg, sched, height=H, width=W,
                                   first_sample_id=16 * it, first_group_id=2 * it)
        r = colour_reward(roll.images)
        adv = compute_advantages(r, np.asarray(roll.group_ids))
        ts, m = T.dit_update_jit(spec, ts, R.dit_batch(roll, adv.advantages, adv.weights), ref)
        curve.append(r.mean())
        kls.append(float(m["kl_loss"]))
    return np.asarray(curve), np.asarray(kls)


@learning
def test_dit_learns_a_colour_reward(stack, prompts, glyph):
    # z = 8.7 / 45.6 after 40 / 60 steps (unoptimised XLA code); 22.8 after 45 (LEARN_FLAGS), 0.1 at lr 0
    curve, kls = run_dit(stack, prompts, glyph, 1e-2, 45)
    flat, flat_kl = run_dit(stack, prompts, glyph, 0.0, 45)
    z, z0 = rise_z(curve), rise_z(flat)
    print(f"DiT colour reward: lr 1e-2 z={z:.1f} ({curve[:10].mean():.5f} -> {curve[-10:].mean():.5f}), "
          f"lr 0 z={z0:.1f}, KL last {kls[-1]:.3g}")
    assert z > 3, (z, curve[:10].mean(), curve[-10:].mean())
    assert z0 < 3, z0
    # lr 0: the policy is the reference, so the KL vanishes (up to last-bit rounding: the reference forward is
    # not differentiated, and XLA may fuse it differently from the policy's, e.g. around the DiT's custom VJPs)
    assert np.all(np.isfinite(kls)) and kls[-1] > 0 and np.all(np.abs(flat_kl) < 1e-12), flat_kl.max()


AR_LAYOUT = ArLayout.i2i(H, W)  # the 2x2 target grid only (N = 5)


def run_ar(stack, glyph, lr: float, steps: int, key: int = 0):
    """AR GRPO on the colour reward of ODE-decoded images: `ar_group_rollout` (2 prompts x 8, x_T shared by a
    group) -> group advantages -> `ar_update_jit` (beta > 0: k3 KL to the initial policy). One rollout key and
    group ids that restart at 0 freeze each group's x_T over the run; sample ids advance, so every step draws
    fresh tokens."""
    g, p = 8, len(TEXTS)
    cfg = R.ArRolloutConfig(group_size=g, sampling=SAMPLING, decode_steps=3, decode_guidance=1.5)
    spec, ts = ar_setup(stack, lr=lr, beta=0.01)
    ref = jax.tree.map(jnp.copy, ts.ar.params)  # the update donates ts
    prompts = make_prompts(stack, TEXTS, AR_LAYOUT)
    sched = stack.schedule(cfg.decode_steps, H, W)
    curve, kls = [], []
    for it in range(steps):
        roll = R.ar_group_rollout(T.policy_split(spec.graphdef, ts.ar), stack.dit, stack.vae, prompts, *glyph,
                                  jax.random.key(key), cfg, sched, n_codes=stack.n_codes, eos_id=stack.eos_id,
                                  height=H, width=W, first_sample_id=p * g * it, first_group_id=0)
        r = colour_reward(roll.images)
        adv = compute_advantages(r, np.asarray(roll.group_ids))
        ts, m = T.ar_update_jit(spec, ts, R.ar_batch(roll, adv.advantages, adv.weights), ref)
        curve.append(r.mean())
        kls.append(float(m["kl_loss"]))
    return np.asarray(curve), np.asarray(kls)


@learning
def test_ar_learns_a_colour_reward_of_its_decoded_images(stack, glyph):
    """The AR policy learns the colour reward of the images the (unmodified) tiny DiT renders from its tokens,
    through the real path: `ar_group_rollout` (processed policy T 0.9 / top-p 0.75, 3-step ODE render with CFG
    1.5, x_T shared within a group) and `ar_update_jit` (beta 0.01); the same run at lr 0 does not move.

    Two choices make the tiny random stack learnable in a few CPU seconds (all numbers measured at 64x64 with
    this render):

    * x_T is frozen over the run (one rollout key, group ids restart at 0; sample ids advance, so the tokens are
      fresh at every step). The random DiT's prior path is weak (N(0, 0.02) init: the prior projector's output
      is 4 % of the patch features, and the DiT moves the latent by ~11 % of x_T), and what a code does to the
      colour depends on x_T: the reward effect of one code in one grid cell, compared over 127 codes under two
      different x_T, correlates at -0.03 on average (24 pairs, -0.33 .. 0.20). Averaged over x_T every token
      choice then scores the same, and a fresh x_T per step leaves nothing to learn (z = 1.8, 0.5, 0.0 for
      keys 0, 1000, 2000). For a fixed x_T the reward is a fixed function of the four codes, which the policy
      can climb.
    * The target-only layout (`ArLayout.i2i`, text prompt `...<sop>2 2<eop><bos>`): the 64x64 t2i layout
      trains 256 preview tokens next to the 4 target tokens (64:1, against 1:4 at 1024x1024); the preview
      tokens never reach the image and their score-function noise drowns the target tokens' weak signal (t2i,
      x_T frozen: z = 1.0 after 40 steps).

    The tokens move the images little (redrawing the four codes changes a pixel by 0.27 uint8 levels, a new x_T
    by 11), so the reward differences are ~2e-5 (9.9e-4 over x_T); the group normalisation makes their scale
    irrelevant, and with x_T frozen the curve's step-to-step noise (token sampling only) is of the same size.
    Measured: z = 9.6, 9.9, 12.2 at lr 3e-3 (keys 0, 1000, 2000), z = 1.6 and 0.3 at lr 0 (keys 0, 1000); with
    LEARN_FLAGS (XLA's optimised CPU code, other rounding) z = 18.2 at lr 3e-3 and 1.6 at lr 0 (key 0).
    """
    curve, kls = run_ar(stack, glyph, 3e-3, 40)
    flat, flat_kl = run_ar(stack, glyph, 0.0, 40)
    z, z0 = rise_z(curve), rise_z(flat)
    print(f"AR colour reward: lr 3e-3 z={z:.1f} ({curve[:10].mean():.7f} -> {curve[-10:].mean():.7f}), "
          f"lr 0 z={z0:.1f}, KL last {kls[-1]:.3g}")
    assert z > 3, (z, curve[:10].mean(), curve[-10:].mean())
    assert z0 < 3, z0
    # lr 0: the policy is the reference, so the KL vanishes (up to last-bit rounding: the reference forward is
    # not differentiated, and XLA may fuse it differently from the policy's, e.g. around the DiT's custom VJPs)
    assert np.all(np.isfinite(kls)) and kls[-1] > 0 and np.all(np.abs(flat_kl) < 1e-12), flat_kl.max()
