"""Flow sampler: schedule vs diffusers (bitwise), ODE rollout vs `GlmImagePipeline` (t2i with and without CFG,
i2i with reference K/V), SDE kernels (a = 0 is the ODE, log-prob is the Gaussian density, replay equals
rollout), KL, and the noise-key recipe (tiny fp32 models)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from glm_jax.sampling import flow
from glm_jax.sampling.schedule import flow_schedule
from tests.tiny_torch import tiny_scheduler

SCHED_CFG = dict(tiny_scheduler().config)


# ------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("hw", [(512, 512), (1024, 1024), (1024, 1152), (2048, 2048)])
def test_schedule_equals_diffusers_pipeline_path(steps, hw):
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps
    h, w = hw
    sched = tiny_scheduler()
    t = np.linspace(sched.config.num_train_timesteps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(((h // 8) * (w // 8)) // 4, 256, 0.25, 0.75)
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", t, t / sched.config.num_train_timesteps, mu=mu)
    ours = flow_schedule(steps, h, w, SCHED_CFG)
    assert ours.mu == mu
    assert ours.sigmas.dtype == np.float32 and ours.sigmas.shape == (steps + 1,)
    np.testing.assert_array_equal(ours.sigmas, sched.sigmas.numpy())        # bitwise
    np.testing.assert_array_equal(ours.timesteps, (timesteps - 1).numpy())  # the DiT gets t - 1
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0 and ours.timesteps[0] == 999.0


def test_schedule_values_from_the_brief():
    s = flow_schedule(10, 1024, 1024, SCHED_CFG)
    np.testing.assert_array_equal(s.timesteps, np.arange(999, 0, -100, dtype=np.float32))
    want = [1, .9669, .9286, .8835, .8298, .7647, .6842, .5821, .4483, .2653, 0]
    np.testing.assert_allclose(s.sigmas, want, atol=6e-5)
    assert flow_schedule(50, 512, 512, SCHED_CFG).mu == 1.75
    assert flow_schedule(50, 2048, 2048, SCHED_CFG).mu == 6.25


# ---------------------------------------------------------- transitions (no model)


def _ulp_diff(a, b) -> int:
    a, b = np.asarray(a, np.float32).view(np.int32), np.asarray(b, np.float32).view(np.int32)
    return int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64))))


def test_transition_std_table_1024_n10():
    s = flow_schedule(10, 1024, 1024, SCHED_CFG)
    sde = [float(flow.transition_std(s, k, 0.7, "sde")[1]) for k in range(10)]
    cps = [float(flow.transition_std(s, k, 0.8, "cps")[1]) for k in range(10)]
    np.testing.assert_allclose(sde, [.70, .74, .54, .45, .39, .36, .33, .30, .27, .22], atol=6e-3)
    np.testing.assert_allclose(cps, [.92, .88, .84, .79, .73, .65, .55, .43, .25, 0], atol=6e-3)
    assert float(flow.transition_std(s, 0, 0.7, "sde")[1]) == np.float32(0.7)  # s_0 = a exactly


@pytest.mark.parametrize("kernel", ["sde", "cps"])
def test_zero_noise_level_is_the_euler_step(kernel):
    s = flow_schedule(7, 64, 96, SCHED_CFG)
    kx, kv = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 8, 12, 16))
    v = jax.random.normal(kv, (3, 8, 12, 16))
    for k in range(7):
        mean, std = flow.transition_mean(x, v, s, k, 0.0, kernel)
        euler = flow.euler_step(x, v, s, k)
        assert float(std) == 0.0
        if kernel == "sde":
            assert _ulp_diff(mean, euler) <= 1
        else:
            np.testing.assert_allclose(mean, euler, rtol=1e-6, atol=1e-6)
        lp = flow.gaussian_logprob(euler, mean, std, kernel)
        np.testing.assert_array_equal(lp, 0.0)  # never evaluated where s = 0


@jax.jit
def _density_and_kl(sched_arrays, k, key, n=400):
    """Everything the density / KL test needs for step k, in one compiled call (D = 2048, 2 samples)."""
    sched = flow.FlowSchedule(*sched_arrays, mu=0.0)
    keys = jax.random.split(key, 4)
    shape = (2, 8, 16, 16)
    m_theta = jax.random.normal(keys[0], shape)
    m_ref = m_theta + 0.05 * jax.random.normal(keys[1], shape)
    std_dev_t, std = flow.transition_std(sched, k, 0.7, "sde")
    x_next = m_theta + std * jax.random.normal(keys[2], shape)
    xs = m_theta[None] + std * jax.random.normal(keys[3], (n, *shape))
    diff = jax.vmap(lambda x: flow.gaussian_logprob(x, m_theta, std)
                    - flow.gaussian_logprob(x, m_ref, std))(xs)
    return {"m": m_theta, "x_next": x_next, "std": std, "std_dev_t": std_dev_t,
            "lp": flow.gaussian_logprob(x_next, m_theta, std),
            "lp_cps": flow.gaussian_logprob(x_next, m_theta, std, "cps"),
            "kl": flow.mean_kl(m_theta, m_ref, std), "kl_fg": flow.kl_fg(m_theta, m_ref, sched, k, 0.7),
            "mc": diff.mean(0), "se": diff.std(0) / math.sqrt(n)}


def test_logprob_is_the_gaussian_density_and_kl_matches_monte_carlo():
    s = flow_schedule(10, 1024, 1024, SCHED_CFG)
    for k in (0, 4, 9):
        r = jax.tree.map(np.asarray, _density_and_kl((s.timesteps, s.sigmas), k, jax.random.key(k)))
        x1, m = r["x_next"].astype(np.float64), r["m"].astype(np.float64)
        want = scipy.stats.norm.logpdf(x1, m, float(r["std"])).reshape(2, -1).mean(1)
        np.testing.assert_allclose(r["lp"], want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r["lp_cps"], -np.square(x1 - m).reshape(2, -1).mean(1), rtol=1e-6)
        # closed-form KL == Monte-Carlo mean of lp_theta - lp_ref under x' ~ N(m_theta, s^2)
        assert np.all(np.abs(r["mc"] - r["kl"]) < 3 * r["se"] + 1e-7)
        # Flow-GRPO's convention divides by std_dev_t^2 = g^2, i.e. h_k times the exact KL
        h = float(s.sigmas[k] - s.sigmas[k + 1])
        np.testing.assert_allclose(r["std"], r["std_dev_t"] * math.sqrt(h), rtol=1e-6)
        np.testing.assert_allclose(r["kl_fg"], h * r["kl"], rtol=1e-5)


# ---------------------------------------------------------------------- noise keys


def test_noise_keys_unique_per_sample_and_reproducible():
    ids = jnp.arange(16, 24)  # one group of 8, global ids 16..23
    shape = (32, 32, 16)
    root = jax.random.key(7)
    for k in range(4):
        xi = np.asarray(flow.step_noise(root, ids, k, shape)).reshape(8, -1)
        corr = np.corrcoef(xi)
        assert np.max(np.abs(corr - np.eye(8))) < 0.05
    a = np.asarray(flow.step_noise(root, ids, 0, shape)).reshape(8, -1)
    b = np.asarray(flow.step_noise(root, ids, 1, shape)).reshape(8, -1)
    assert np.max(np.abs([np.corrcoef(a[i], b[i])[0, 1] for i in range(8)])) < 0.05  # fresh noise every step
    root_x = jax.random.key(3)
    x_t = flow.initial_latents(root_x, ids, shape)
    np.testing.assert_array_equal(x_t, flow.initial_latents(jax.random.key(3), ids, shape))  # bitwise
    assert not np.any([np.array_equal(x_t[i], x_t[j]) for i in range(8) for j in range(i)])
    same = flow.initial_latents(root_x, ids, shape, same_latent=True, group_size=8)
    assert all(np.array_equal(same[0], same[i]) for i in range(8))
    two = flow.initial_latents(root_x, jnp.arange(8), shape, same_latent=True, group_size=4)
    assert np.array_equal(two[0], two[3]) and not np.array_equal(two[3], two[4])
    assert abs(float(np.asarray(x_t).std()) - 1.0) < 0.02


# --------------------------------------------------------- models and the pipeline

H, W = 64, 96
SRC_H, SRC_W = 96, 64
PROMPTS = ['A sign that says "OPEN"', 'Poster with "SALE" and "50% OFF"']
STEPS = 4


@pytest.fixture(scope="module")
def stack():
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline
    from transformers import ByT5Tokenizer

    from conversion.apply import load_state_dict_into
    from conversion.tables import dit as dit_table
    from conversion.tables import t5 as t5_table
    from conversion.tables import vae as vae_table
    from glm_jax.models.dit import DiTConfig, GlmImageDiT
    from glm_jax.models.t5 import T5Config, T5Encoder
    from glm_jax.models.vae import AutoencoderKL, VAEConfig
    from tests.tiny_torch import tiny_dit, tiny_t5, tiny_vae
    from tests.util import torch_to_numpy_state

    def load(make, torch_model, table, **kw):
        """Builds the module abstractly (no random init) and loads every torch tensor into it."""
        module = nnx.eval_shape(make)
        return load_state_dict_into(module, torch_to_numpy_state(torch_model), table.RULES, **kw)

    t_dit, t_vae, t_t5 = tiny_dit(11), tiny_vae(12), tiny_t5(13)
    dit = load(lambda: GlmImageDiT(DiTConfig.from_hf(dict(t_dit.config)), rngs=nnx.Rngs(0)), t_dit, dit_table)
    vae = load(lambda: AutoencoderKL(VAEConfig.from_hf(dict(t_vae.config)), rngs=nnx.Rngs(0)), t_vae,
               vae_table)
    t5 = load(lambda: T5Encoder(T5Config.from_hf(t_t5.config.to_dict()), rngs=nnx.Rngs(0)), t_t5, t5_table,
              ignore=t5_table.ignore_on_import)
    pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=None, text_encoder=t_t5,
                            vision_language_encoder=None, vae=t_vae, transformer=t_dit,
                            scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return {"dit": dit, "vae": vae, "t5": t5, "pipe": pipe}


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    ar = torch.randint(0, 128, (len(PROMPTS), H // 32, W // 32), generator=g)
    prior = ar.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(len(PROMPTS), -1)  # x2 nearest, raster
    latents = torch.randn(len(PROMPTS), 16, H // 8, W // 8, generator=g)
    return prior, latents


def _nhwc(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def _run_pipeline(pipe, prior, latents, guidance, **kw):
    seen = {}

    def grab(_pipe, _i, _t, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    out = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=guidance,
               latents=latents.clone(), prior_token_ids=prior, output_type="np", callback_on_step_end=grab,
               **kw)
    return seen["latents"].permute(0, 2, 3, 1).numpy(), out.images


def _cond(stack, prior, guidance, ref_kv=None):
    from glm_jax import glyph
    emb, _ = glyph.glyph_embeds(stack["t5"], PROMPTS)
    neg = glyph.negative_glyph_embeds(stack["t5"], len(PROMPTS)) if guidance > 1 else None
    return flow.make_cond(emb, jnp.asarray(prior.numpy()), H, W, neg_glyph_BTD=neg, ref_kv=ref_kv)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("guidance", [1.5, 1.0])
def test_ode_t2i_matches_pipeline(stack, guidance):
    prior, latents = _inputs(seed=int(guidance * 10))
    want_x, want_img = _run_pipeline(stack["pipe"], prior, latents, guidance)
    sched = flow_schedule(STEPS, H, W, SCHED_CFG)
    cond = _cond(stack, prior, guidance)
    x = flow.ode_sample_jit(stack["dit"], _nhwc(latents), cond, sched, guidance=guidance)
    img = flow.decode_float(stack["vae"], x)
    assert _err(x, want_x) < 1e-4, _err(x, want_x)
    assert _err(img, want_img) < 1e-4, _err(img, want_img)
    u8 = flow.decode_images(stack["vae"], x)
    assert u8.dtype == jnp.uint8 and u8.shape == (2, H, W, 3)
    assert np.max(np.abs(np.asarray(u8, int) - np.round(want_img * 255))) <= 1


def _sources(stack, seed: int):
    """Two different source images (one per prompt), the pipeline's VAE preprocessing, and their prior ids."""
    import PIL.Image
    rng = np.random.RandomState(seed)
    images = [PIL.Image.fromarray((rng.rand(SRC_H, SRC_W, 3) * 255).astype(np.uint8)) for _ in PROMPTS]
    preprocess = stack["pipe"].image_processor.preprocess
    pixels = torch.cat([preprocess(im, height=SRC_H, width=SRC_W) for im in images])
    g = torch.Generator().manual_seed(seed)
    ar = torch.randint(0, 128, (len(PROMPTS), SRC_H // 32, SRC_W // 32), generator=g)
    ids = ar.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(len(PROMPTS), -1)
    grid = [torch.tensor([[1, SRC_H // 16, SRC_W // 16]]) for _ in PROMPTS]
    return images, pixels, ids, grid


def test_ode_i2i_matches_pipeline(stack):
    guidance = 1.5
    prior, latents = _inputs(seed=5)
    images, pixels, src_ids, grid = _sources(stack, seed=6)
    want_x, want_img = _run_pipeline(stack["pipe"], prior, latents, guidance, image=[[im] for im in images],
                                     prior_token_image_ids=list(src_ids), source_image_grid_thw=grid)
    vae, dit = stack["vae"], stack["dit"]
    z_ref = vae.normalize(vae.encode_mean(_nhwc(pixels)))
    ref_kv = flow.reference_kv_jit(dit, z_ref, jnp.asarray(src_ids.numpy()), (SRC_H, SRC_W))
    sched = flow_schedule(STEPS, H, W, SCHED_CFG)
    cond = _cond(stack, prior, guidance, ref_kv)
    x = flow.ode_sample_jit(dit, _nhwc(latents), cond, sched, guidance=guidance)
    assert _err(x, want_x) < 1e-4, _err(x, want_x)
    assert _err(flow.decode_float(vae, x), want_img) < 1e-4
    # the reference keys matter: without them the result is different
    x_noref = flow.ode_sample_jit(dit, _nhwc(latents), cond._replace(ref_kv=None), sched, guidance=guidance)
    assert _err(x_noref, want_x) > 1e-3
    # an SDE rollout with reference K/V replays exactly
    roll = flow.sde_sample_jit(dit, _nhwc(latents), cond, sched, jax.random.key(0), jnp.arange(2),
                               guidance=guidance, noise_level=0.7)
    rep = flow.step_logprob_jit(dit, roll.x[:, 2], roll.x_next[:, 2], 2, cond, sched, guidance=guidance,
                                noise_level=0.7)
    assert _err(rep.logprob, roll.logprob[:, 2]) <= 1e-6


# --------------------------------------------------------------------- SDE rollout


@pytest.fixture(scope="module")
def t2i(stack):
    prior, latents = _inputs(seed=21)
    return {"cond": _cond(stack, prior, 1.5), "x_T": _nhwc(latents),
            "sched": flow_schedule(STEPS, H, W, SCHED_CFG)}


def test_sde_zero_noise_reproduces_the_ode(stack, t2i):
    ode = flow.ode_sample_jit(stack["dit"], t2i["x_T"], t2i["cond"], t2i["sched"], guidance=1.5)
    roll = flow.sde_sample_jit(stack["dit"], t2i["x_T"], t2i["cond"], t2i["sched"], jax.random.key(0),
                               jnp.arange(2), guidance=1.5, noise_level=0.0)
    assert _err(roll.latents, ode) < 1e-5
    np.testing.assert_array_equal(roll.logprob, 0.0)
    np.testing.assert_array_equal(roll.std, 0.0)
    np.testing.assert_array_equal(roll.mean, roll.x_next)


@pytest.mark.parametrize("kernel,level", [("sde", 0.7), ("cps", 0.8)])
def test_sde_rollout_logprob_density_and_replay(stack, t2i, kernel, level):
    dit, cond, sched = stack["dit"], t2i["cond"], t2i["sched"]
    mask = np.array([True, False, True, True])
    root, ids = jax.random.key(3), jnp.array([40, 41])
    roll = flow.sde_sample_jit(dit, t2i["x_T"], cond, sched, root, ids, guidance=1.5, noise_level=level,
                               kernel=kernel, sde_mask=mask)
    np.testing.assert_array_equal(roll.steps, [0, 2, 3])
    assert roll.x.shape == (2, 3, H // 8, W // 8, 16) and roll.logprob.shape == (2, 3)
    assert np.all(np.isfinite(roll.logprob))
    # chained: x_{k+1} of stored step 2 is x_k of step 3; x_0 is x_T; the ODE step 1 links steps 0 and 2
    np.testing.assert_array_equal(roll.x[:, 0], t2i["x_T"])
    np.testing.assert_array_equal(roll.x_next[:, 1], roll.x[:, 2])
    np.testing.assert_array_equal(roll.x_next[:, 2], roll.latents)
    ode_step = flow.step_logprob_jit(dit, roll.x_next[:, 0], roll.x[:, 1], 1, cond, sched, guidance=1.5,
                                     noise_level=0.0, kernel=kernel)
    assert _err(ode_step.mean, roll.x[:, 1]) < 1e-5 and np.all(np.asarray(ode_step.std) == 0)
    for j, k in enumerate([0, 2, 3]):
        std = float(roll.std[j])
        assert std == float(flow.transition_std(sched, k, level, kernel)[1])
        xi = flow.step_noise(root, ids, k, (H // 8, W // 8, 16))
        if std > 0:
            assert _err(roll.x_next[:, j], roll.mean[:, j] + std * xi) < 1e-6
            x1, m = np.asarray(roll.x_next[:, j], np.float64), np.asarray(roll.mean[:, j], np.float64)
            dens = scipy.stats.norm.logpdf(x1, m, std) if kernel == "sde" else -np.square(x1 - m)
            want = dens.reshape(2, -1)
            np.testing.assert_allclose(roll.logprob[:, j], want.mean(1), atol=1e-6, rtol=0)
        else:  # cps at the last step: deterministic, lp not evaluated
            assert kernel == "cps" and k == STEPS - 1 and np.all(np.asarray(roll.logprob[:, j]) == 0)
        rep = flow.step_logprob_jit(dit, roll.x[:, j], roll.x_next[:, j], k, cond, sched, guidance=1.5,
                                    noise_level=level, kernel=kernel)
        assert _err(rep.logprob, roll.logprob[:, j]) <= 1e-6
        assert _err(rep.mean, roll.mean[:, j]) <= 1e-6
    # per-sample steps (a DanceGRPO-style shuffled replay): sample 0 at step 3, sample 1 at step 0
    x_k = jnp.stack([roll.x[0, 2], roll.x[1, 0]])
    x_next = jnp.stack([roll.x_next[0, 2], roll.x_next[1, 0]])
    rep = flow.step_logprob_jit(dit, x_k, x_next, jnp.array([3, 0]), cond, sched, guidance=1.5,
                                noise_level=level, kernel=kernel)
    want = np.array([roll.logprob[0, 2], roll.logprob[1, 0]])
    assert _err(rep.logprob, want) <= 1e-6


def test_vae_decode_in_chunks_equals_whole_batch():
    """Large rollout batches are decoded a few images at a time; the images must not depend on the chunking."""
    from glm_jax.models.vae import AutoencoderKL, VAEConfig
    from glm_jax.tiny import tiny_vae_config

    vae = AutoencoderKL(VAEConfig.from_hf(tiny_vae_config()), rngs=nnx.Rngs(0))
    lat = jax.random.normal(jax.random.key(0), (5, 4, 6, vae.cfg.latent_channels))
    whole = flow.decode_float(vae, lat, chunk=0)
    assert whole.shape[0] == 5 and float(whole.std()) > 0
    np.testing.assert_allclose(np.asarray(flow.decode_float(vae, lat, chunk=2)), np.asarray(whole), atol=1e-5)
    u8 = [np.asarray(flow.decode_images(vae, lat, chunk=c), np.int16) for c in (2, 0)]
    assert u8[0].shape == (5, *whole.shape[1:]) and np.abs(u8[0] - u8[1]).max() <= 1  # fp rounding at .5
