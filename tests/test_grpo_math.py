"""Invariants of the GRPO math (`design/grpo_math.md` §4: T1a, T7, T9, T10, T11) on random arrays, no models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.grpo import (
    ar_loss_normalizers,
    ar_policy_loss,
    compute_advantages,
    dit_kl,
    dit_loss_normalizers,
    dit_policy_loss,
    group_advantages_jnp,
    k3,
    parent_mean,
    vocab_kl,
)
from glm_jax.sampling.ar_sampler import SamplingParams, processed_and_temperature_logprobs
from glm_jax.sampling.schedule import FlowSchedule

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


# ---------------------------------------------------------------------------------------- references


def ref_advantages(r, gid, scale, eps=1e-4):
    """Loop-based numpy reference of the group rule (ddof 0), NaN excluded, no clipping."""
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    ok = ~np.isnan(r)
    batch_std = r[ok].std()
    for g in np.unique(gid):
        idx = np.where((gid == g) & ok)[0]
        vals = r[idx]
        if vals.size == 0 or vals.max() == vals.min():
            continue
        s = {"group": vals.std() + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out[idx] = (vals - vals.mean()) / s
    return out


def trl_gdpo(comps, weights, g, eps=1e-4):
    """TRL's `normalize_then_sum` written out for contiguous groups of size g (with ddof 0 as the spec)."""
    x = np.stack(comps, axis=1)                                     # [B, J]
    grouped = x.reshape(-1, g, x.shape[1])
    mean = np.nanmean(grouped, axis=1, keepdims=True)
    std = np.sqrt(np.nanmean((grouped - mean) ** 2, axis=1, keepdims=True))
    z = ((grouped - mean) / (std + eps)).reshape(-1, x.shape[1])
    rew = np.nansum(z * np.asarray(weights)[None], axis=1)
    return (rew - rew.mean()) / (rew.std() + eps)


# ---------------------------------------------------------------------------------------- T7 advantages


@pytest.mark.parametrize("g", [3, 8, 24])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_group_is_exactly_zero(g, dtype):
    rng = np.random.default_rng(g)
    r = np.concatenate([np.full(g, 0.1, dtype), rng.normal(size=g).astype(dtype),
                        np.full(g, dtype(0.1) * 3, dtype)])
    gid = np.repeat([7, 2, 40], g)
    for scale in ("group", "batch", "none"):
        out = compute_advantages(r, gid, scale_rewards=scale)
        assert np.all(out.advantages[:g] == 0) and np.all(out.advantages[2 * g:] == 0)
        assert np.all(out.weights[:g] == 0) and np.all(out.weights[2 * g:] == 0)
        assert np.all(out.weights[g:2 * g] == 1) and np.any(out.advantages[g:2 * g] != 0)
        assert out.metrics["zero_std_ratio"] == pytest.approx(2 / 3)
        j = group_advantages_jnp(jnp.asarray(r, jnp.float32), jnp.asarray(np.repeat([0, 1, 2], g)), 3,
                                 scale_rewards=scale)
        assert np.all(np.asarray(j.advantages)[:g] == 0) and np.all(np.asarray(j.weights)[:g] == 0)
        assert np.all(np.asarray(j.advantages)[2 * g:] == 0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scales_match_reference_and_groups_sum_to_zero(scale):
    rng = np.random.default_rng(1)
    sizes = [3, 5, 8, 2, 6]
    ids = rng.permutation(np.repeat([91, 4, 17, 250, 33], sizes))   # arbitrary ids, interleaved groups
    r = rng.normal(size=ids.size) * rng.uniform(0.1, 3, size=ids.size)
    r[3] = np.nan
    out = compute_advantages(r, ids, scale_rewards=scale, clip=None)
    ref = ref_advantages(r, ids, scale)
    np.testing.assert_allclose(out.advantages, ref, rtol=1e-6, atol=1e-6)
    assert out.advantages[3] == 0 and out.weights[3] == 0
    for g in np.unique(ids):
        assert abs(out.advantages[ids == g].sum()) < 1e-5
    # jnp version under jit, remapped ids 0..4, float32
    remap = np.searchsorted(np.unique(ids), ids)
    f = jax.jit(lambda x, i: group_advantages_jnp(x, i, 5, scale_rewards=scale, clip=None))
    j = f(jnp.asarray(r, jnp.float32), jnp.asarray(remap))
    np.testing.assert_allclose(np.asarray(j.advantages), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(j.weights), out.weights)


def test_permutation_equivariance():
    """Advantages depend on group membership only, not on where a sample sits in the gathered batch."""
    rng = np.random.default_rng(2)
    ids = np.repeat(np.arange(6), 4)
    r = rng.normal(size=24)
    p = rng.permutation(24)
    a = compute_advantages(r, ids).advantages
    b = compute_advantages(r[p], ids[p]).advantages
    np.testing.assert_array_equal(a[p], b)


def test_clip_and_nan_handling():
    r = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, np.nan, 1.0, 2.0, np.nan])
    ids = np.array([0] * 8 + [1] * 4)
    out = compute_advantages(r, ids, scale_rewards="none")
    assert out.advantages[7] == 5.0 and np.all(out.advantages[:7] == -5.0)
    raw = compute_advantages(r, ids, scale_rewards="none", clip=None)
    assert raw.advantages[7] == pytest.approx(87.5) and raw.metrics["adv_clip_frac"] == 0
    assert out.metrics["adv_clip_frac"] == pytest.approx(8 / 12)
    # NaN excluded: group 1 behaves like the group {1, 2}
    assert out.advantages[8] == 0 and out.advantages[11] == 0
    assert out.weights[8] == 0 and out.weights[11] == 0 and out.weights[9] == 1
    np.testing.assert_allclose(out.advantages[9:11], compute_advantages(r[9:11], [3, 3], scale_rewards="none").advantages)
    # a group with one applicable reward is constant
    one = compute_advantages(np.array([1.0, np.nan, 3.0, 4.0]), [0, 0, 1, 1])
    assert one.advantages[0] == 0 and one.weights[0] == 0
    # an all-NaN batch is finite
    z = compute_advantages(np.full(4, np.nan), [0, 0, 1, 1])
    assert np.all(z.advantages == 0) and np.all(z.weights == 0)


def test_single_member_groups_fall_back_to_batch():
    rng = np.random.default_rng(3)
    r = rng.normal(size=10)
    ref = (r - r.mean()) / (r.std() + 1e-4)
    for ids in (None, np.arange(10) * 3):
        np.testing.assert_allclose(compute_advantages(r, ids).advantages, ref, rtol=1e-6)
    j = group_advantages_jnp(jnp.asarray(r, jnp.float32), jnp.arange(10))
    np.testing.assert_allclose(np.asarray(j.advantages), ref, rtol=1e-4)


def test_multi_reward_aggregations():
    rng = np.random.default_rng(4)
    g, n_groups = 6, 5
    a = rng.normal(size=g * n_groups)
    b = rng.uniform(size=g * n_groups) * 10
    b[[2, 13, 20]] = np.nan                                    # not applicable for some samples
    w = {"a": 0.7, "b": 1.3}
    ids = np.repeat(np.arange(n_groups), g)
    # sum_then_normalize: weighted sum over applicable components, then the group rule
    s = compute_advantages({"a": a, "b": b}, ids, reward_weights=w, clip=None)
    total = 0.7 * a + 1.3 * np.where(np.isnan(b), 0, b)
    np.testing.assert_allclose(s.advantages, ref_advantages(total, ids, "group"), rtol=1e-5, atol=1e-6)
    # GDPO vs TRL's formula
    gd = compute_advantages({"a": a, "b": b}, ids, reward_weights=w, aggregation="normalize_then_sum", clip=None)
    np.testing.assert_allclose(gd.advantages, trl_gdpo([a, b], [0.7, 1.3], g), rtol=1e-5, atol=1e-6)
    assert np.all(gd.weights == 1)
    assert s.metrics["b/nan_frac"] == pytest.approx(0.1)
    assert s.metrics["a/mean"] == pytest.approx(a.mean()) and s.metrics["b/std"] == pytest.approx(np.nanstd(b))
    # GDPO: a group constant in every component gets A = 0, w = 0
    a2, b2 = a.copy(), b.copy()
    a2[:g], b2[:g] = 0.3, 2.0
    gd2 = compute_advantages({"a": a2, "b": b2}, ids, aggregation="normalize_then_sum")
    assert np.all(gd2.advantages[:g] == 0) and np.all(gd2.weights[:g] == 0) and np.all(gd2.weights[g:] == 1)


def test_parent_mean():
    r = np.array([1.0, 3.0, np.nan, 5.0, np.nan, np.nan])
    np.testing.assert_array_equal(parent_mean(r, [4, 4, 9, 9, 2, 2]), [np.nan, 2.0, 5.0])


# ------------------------------------------------------------------------------------ AR loss helpers


def _ar_data(seed, b=8, t=12, spread=0.3, equal=False):
    rng = np.random.default_rng(seed)
    lp_new = np.log(rng.uniform(0.05, 1.0, size=(b, t))).astype(np.float32)
    lp_old = (lp_new + rng.normal(scale=spread, size=(b, t))).astype(np.float32)
    if equal:
        mask = np.zeros((b, t), bool)
        for i in range(b):  # same count per row, different positions
            mask[i, rng.choice(t, t - 3, replace=False)] = True
    else:
        lens = rng.integers(2, t + 1, size=b)
        mask = np.arange(t)[None] < lens[:, None]
    adv = rng.normal(size=b).astype(np.float32)
    lq_new = (lp_new - rng.uniform(0.0, 0.5, size=(b, t))).astype(np.float32)
    lq_ref = (lq_new + rng.normal(scale=0.2, size=(b, t))).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (lp_new, lp_old, mask, adv, lq_new, lq_ref))


# -------------------------------------------------------------------------------------- T9 aggregation


def test_equal_lengths_all_loss_types_agree():
    lp_new, lp_old, mask, adv, lq_new, lq_ref = _ar_data(0, equal=True)
    t_active = int(mask[0].sum())
    for beta in (0.0, 0.05):
        vals = [ar_policy_loss(lp_new, lp_old, mask, adv, eps_low=0.2, eps_high=0.28, loss_type=lt, beta=beta,
                               lq_new=lq_new, lq_ref=lq_ref, max_len=t_active)[0] for lt in LOSS_TYPES]
        np.testing.assert_allclose(vals, vals[0], rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_micro_batch_invariance(loss_type, is_level):
    """Gradient of one batch == sum of the gradients of 4 micro-batches with the global normalisers."""
    lp_base, lp_old, mask, adv, lq_base, lq_ref = _ar_data(1, b=8, t=10)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 10, 3)).astype(np.float32)) * 0.1
    weight = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
    theta = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)

    @jax.jit
    def grad(th, data, norm):
        def loss(th):
            x_, lp_, old_, m_, a_, w_, lq_, ref_ = data
            d = x_ @ th
            return ar_policy_loss(lp_ + d, old_, m_, a_, w_, eps_low=0.2, eps_high=0.28, loss_type=loss_type,
                                  is_level=is_level, beta=0.1, lq_new=lq_ + d, lq_ref=ref_, norm=norm)[0]
        return jax.grad(loss)(th)

    data = (x, lp_base, lp_old, mask, adv, weight, lq_base, lq_ref)
    parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
    norms = [ar_loss_normalizers(mask[s], weight[s], loss_type, max_len=10) for s in parts]
    norm = jax.tree.map(lambda *n: sum(n), *norms)   # additive == the whole batch's
    whole = ar_loss_normalizers(mask, weight, loss_type, max_len=10)
    np.testing.assert_allclose(np.asarray(norm), np.asarray(whole), rtol=1e-6)
    full = grad(theta, data, norm)
    acc = sum(grad(theta, tuple(d[s] for d in data), norm) for s in parts)
    np.testing.assert_allclose(acc, full, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(full)).max() > 1e-4


def test_dit_micro_batch_invariance():
    rng = np.random.default_rng(6)
    b, k = 8, 4
    lp_base = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
    lp_old = lp_base + jnp.asarray(rng.normal(scale=0.05, size=(b, k)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(b, k, 2)).astype(np.float32))
    adv = jnp.asarray(rng.normal(size=b).astype(np.float32) * 3)
    weight = jnp.asarray([1, 0, 1, 1, 1, 1, 1, 0], jnp.float32)
    step_mask = jnp.asarray(rng.uniform(size=(b, k)) < 0.7)
    kl = jnp.asarray(rng.uniform(size=(b, k)).astype(np.float32))

    def loss(th, sl, norm):
        return dit_policy_loss(lp_base[sl] + x[sl] @ th, lp_old[sl], adv[sl], weight[sl], clip_range=0.05,
                               step_mask=step_mask[sl], beta=0.3, kl_terms=kl[sl] * (1 + x[sl, :, 0] * th[0]),
                               norm=norm)[0]

    th = jnp.asarray([0.1, -0.3], jnp.float32)
    parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
    norm = dit_loss_normalizers(step_mask, weight)
    full = jax.grad(loss)(th, slice(None), norm)
    acc = sum(jax.grad(loss)(th, s, norm) for s in parts)
    np.testing.assert_allclose(acc, full, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------- T10 clipping


def test_ar_clip_semantics_token_gradients():
    lp_new, lp_old, mask, adv, _, _ = _ar_data(2, b=16, t=20, spread=0.4)
    eps_lo, eps_hi = 0.2, 0.28
    g = jax.grad(lambda lp: ar_policy_loss(lp, lp_old, mask, adv, eps_low=eps_lo, eps_high=eps_hi)[0])(lp_new)
    r = np.exp(np.asarray(lp_new, np.float64) - np.asarray(lp_old, np.float64))
    a = np.asarray(adv)[:, None]
    m = np.asarray(mask)
    n = m.sum(1, keepdims=True)
    frozen = ((a > 0) & (r > 1 + eps_hi)) | ((a < 0) & (r < 1 - eps_lo))
    expected = np.where(m & ~frozen, -a * r / n / m.shape[0], 0.0)   # grad = -A dr/dlp, grpo 1/(B n_i)
    assert frozen[m].any() and (~frozen[m]).any()
    np.testing.assert_array_equal(np.asarray(g)[m & frozen], 0.0)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-9)
    _, met = ar_policy_loss(lp_new, lp_old, mask, adv, eps_low=eps_lo, eps_high=eps_hi)
    assert float(met["clip_frac_high"]) == pytest.approx(((a > 0) & (r > 1 + eps_hi))[m].mean(), abs=1e-6)
    assert float(met["clip_frac_low"]) == pytest.approx(((a < 0) & (r < 1 - eps_lo))[m].mean(), abs=1e-6)


def test_dit_clip_semantics_gradients():
    rng = np.random.default_rng(7)
    b, k, eps = 12, 5, 0.1
    lp_new = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
    lp_old = lp_new + jnp.asarray(rng.normal(scale=0.15, size=(b, k)).astype(np.float32))
    adv = jnp.asarray(rng.normal(size=b).astype(np.float32))
    g = jax.grad(lambda lp: dit_policy_loss(lp, lp_old, adv, clip_range=eps)[0])(lp_new)
    r = np.exp(np.asarray(lp_new, np.float64) - np.asarray(lp_old, np.float64))
    a = np.asarray(adv)[:, None]
    frozen = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    assert frozen.any() and (~frozen).any()
    np.testing.assert_allclose(np.asarray(g), np.where(frozen, 0.0, -a * r / (b * k)), rtol=1e-5, atol=1e-9)
    _, met = dit_policy_loss(lp_new, lp_old, adv, clip_range=eps)
    assert float(met["clipfrac"]) == pytest.approx((np.abs(r - 1) > eps).mean(), abs=1e-6)
    lr = np.asarray(lp_new, np.float64) - np.asarray(lp_old, np.float64)
    assert float(met["approx_kl"]) == pytest.approx(0.5 * (lr ** 2).mean(), rel=1e-5)


# -------------------------------------------------------------------------------------- T1a on-policy


def _policy_logprobs(theta, tokens, feats):
    """Toy differentiable policy: log_softmax(feats @ theta) gathered at `tokens`."""
    logits = jnp.einsum("btf,fv->btv", feats, theta)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_on_policy_ratio_one_and_reinforce_gradient(is_level, loss_type):
    rng = np.random.default_rng(8)
    b, t, f, v = 6, 9, 4, 7
    feats = jnp.asarray(rng.normal(size=(b, t, f)).astype(np.float32))
    theta = jnp.asarray(rng.normal(size=(f, v)).astype(np.float32))
    tokens = jnp.asarray(rng.integers(0, v, size=(b, t)))
    mask = jnp.asarray(np.arange(t)[None] < rng.integers(3, t + 1, size=b)[:, None])
    adv = jnp.asarray(rng.normal(size=b).astype(np.float32))
    weight = jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)

    def loss(th):
        return ar_policy_loss(_policy_logprobs(th, tokens, feats), None, mask, adv, weight, loss_type=loss_type,
                              is_level=is_level)

    (_, met), g = jax.value_and_grad(loss, has_aux=True)(theta)
    assert float(met["ratio_min"]) == 1.0 and float(met["ratio_max"]) == 1.0 and float(met["clip_frac"]) == 0

    m = mask.astype(jnp.float32)
    n = m.sum(1)

    def reinforce(th):  # at r = 1 the GSPO ratio's gradient is the token mean, so both levels agree
        per_seq = jnp.sum(m * _policy_logprobs(th, tokens, feats), 1)
        if loss_type == "grpo":
            return -jnp.sum(weight * adv * per_seq / n) / jnp.sum(weight)
        return -jnp.sum(weight * adv * per_seq) / jnp.sum(weight * n)

    np.testing.assert_allclose(g, jax.grad(reinforce)(theta), rtol=1e-6, atol=1e-8)


def test_dit_on_policy_gradient_is_mean_reinforce():
    rng = np.random.default_rng(9)
    b, k, f = 6, 4, 3
    feats = jnp.asarray(rng.normal(size=(b, k, f)).astype(np.float32))
    adv = jnp.asarray([0.5, -1.2, 7.0, 2.0, -9.0, 0.3], jnp.float32)   # two beyond the advantage clip
    weight = jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)
    step_mask = jnp.asarray(np.tile([True, True, True, False], (b, 1)))
    th = jnp.asarray(rng.normal(size=f).astype(np.float32))

    def lp_fn(t):
        return jnp.where(step_mask, -jnp.square(feats @ t), jnp.nan)   # garbage outside the trained steps

    def loss(t):
        return dit_policy_loss(lp_fn(t), None, adv, weight, clip_range=1e-4, step_mask=step_mask)

    (_, met), g = jax.value_and_grad(loss, has_aux=True)(th)
    assert float(met["ratio_min"]) == 1.0 and float(met["ratio_max"]) == 1.0 and float(met["clipfrac"]) == 0
    a = jnp.clip(adv, -5, 5)

    def reinforce(t):
        lp = -jnp.square(feats @ t)[:, :3]
        return -jnp.sum(weight[:, None] * a[:, None] * lp) / (3 * jnp.sum(weight))

    np.testing.assert_allclose(g, jax.grad(reinforce)(th), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------- T11 KL


def test_kl_zero_when_theta_is_ref():
    lp_new, lp_old, mask, adv, lq_new, _ = _ar_data(3)
    assert np.all(np.asarray(k3(lq_new, lq_new)) == 0)
    l0, met = ar_policy_loss(lp_new, lp_old, mask, adv, beta=0.5, lq_new=lq_new, lq_ref=lq_new)
    l_nokl, _ = ar_policy_loss(lp_new, lp_old, mask, adv)
    assert float(met["kl_loss"]) == 0 and float(met["kl_mean"]) == 0 and float(l0) == float(l_nokl)
    rows = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(0).normal(size=(3, 11)), jnp.float32))
    rows = rows.at[:, 9:].set(-jnp.inf)
    assert np.all(np.asarray(vocab_kl(rows, rows)) == 0)
    other = jax.nn.log_softmax(jnp.where(jnp.isfinite(rows), rows * 1.3, -jnp.inf))
    p, q = np.exp(np.asarray(rows, np.float64)[:, :9]), np.exp(np.asarray(other, np.float64)[:, :9])
    np.testing.assert_allclose(vocab_kl(rows, other), (p * np.log(p / q)).sum(1), rtol=1e-5)
    # k3 is a non-negative penalty
    assert np.all(np.asarray(k3(lq_new, lq_new + 0.3 * jnp.sin(lq_new * 7))) >= 0)


def test_dit_kl_conventions():
    sig = np.array([1, .9669, .9286, .8835, .8298, .7647, .6842, .5821, .4483, .2653, 0], np.float32)
    sched = FlowSchedule(timesteps=np.linspace(999, 99, 10).astype(np.float32), sigmas=sig, mu=3.25)
    rng = np.random.default_rng(10)
    m_theta = jnp.asarray(rng.normal(size=(3, 4, 4, 16)).astype(np.float32))
    m_ref = m_theta + 0.01 * jnp.asarray(rng.normal(size=(3, 4, 4, 16)).astype(np.float32))
    for k in (0, 4, 8):
        same = dit_kl(m_theta, m_theta, sched, k, 0.7)
        assert np.all(np.asarray(same.fg) == 0) and np.all(np.asarray(same.exact) == 0)
        kl = dit_kl(m_theta, m_ref, sched, k, 0.7)
        h = float(sig[k] - sig[k + 1])
        np.testing.assert_allclose(kl.fg, h * np.asarray(kl.exact), rtol=1e-5)   # KL^FG = h_k KL_k (§3.5)
        a = np.asarray(sig[k], np.float64)
        s_bar = sig[1] if sig[k] == 1 else a
        s2 = (0.7 ** 2) * a / (1 - s_bar) * h
        d2 = np.mean((np.asarray(m_theta, np.float64) - np.asarray(m_ref, np.float64)) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(kl.exact, d2 / (2 * s2), rtol=1e-4)


# -------------------------------------------------------------------------------- nucleus misses


def test_nucleus_miss_tokens_are_excluded_without_nan():
    rng = np.random.default_rng(11)
    b, t, v = 4, 6, 40
    logits0 = jnp.asarray(rng.normal(size=(b, t, v)).astype(np.float32) * 2)
    valid = jnp.ones((v,), bool)
    params = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)
    lp_all, _ = processed_and_temperature_logprobs(logits0, valid, params)
    kept = np.isfinite(np.asarray(lp_all))
    # pick kept tokens, except three positions where the token is outside the trainer's nucleus
    tokens = np.argmax(np.asarray(lp_all), -1)
    miss_pos = [(0, 1), (2, 3), (3, 0)]
    for i, j in miss_pos:
        tokens[i, j] = np.where(~kept[i, j])[0][0]
    tokens = jnp.asarray(tokens)
    mask = jnp.asarray(np.arange(t)[None] < np.array([6, 5, 6, 4])[:, None])
    adv = jnp.asarray([1.0, -0.5, 0.7, -2.0], jnp.float32)
    lp_old = jnp.asarray(rng.normal(scale=0.1, size=(b, t)).astype(np.float32)) - 1.0

    def scores(delta):
        lp, lq = processed_and_temperature_logprobs(logits0 + delta, valid, params)
        take = lambda x: jnp.take_along_axis(x, tokens[..., None], -1)[..., 0]
        return take(lp), take(lq)

    for old in (lp_old, None):
        def loss(delta, old=old):
            lp, lq = scores(delta)
            return ar_policy_loss(lp, old, mask, adv, beta=0.1, lq_new=lq, lq_ref=lq - 0.1)

        (val, met), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.zeros_like(logits0))
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
        assert all(np.isfinite(float(x)) for x in met.values())
        assert float(met["nucleus_miss_rate"]) == pytest.approx(3 / int(mask.sum()))
        # the same loss as with those tokens masked out by hand
        m2 = np.asarray(mask).copy()
        for i, j in miss_pos:
            m2[i, j] = False
        lp, lq = scores(0.0)
        lp_f = jnp.where(jnp.asarray(m2), lp, 0.0)
        ref = ar_policy_loss(lp_f, None if old is None else old, jnp.asarray(m2), adv, beta=0.1,
                             lq_new=lq, lq_ref=lq - 0.1)[0]
        np.testing.assert_allclose(float(val), float(ref), rtol=1e-6)
        for i, j in miss_pos:   # no gradient from a missed token's own logits
            assert np.all(np.asarray(g)[i, j] == 0)
