"""GRPO losses: the AR token-policy loss, the DiT Flow-GRPO loss and their KL terms (`design/grpo_math.md` §2-3).

All functions are pure jax over log-prob arrays (not models), float32, static shapes (masks, never dropped rows),
and are meant to be called inside the jitted train step; `loss_type`, `is_level` and the clip constants are
Python values.

Normalisers (`ArNorm`, `DitNorm`) are sums over samples/tokens, so the normaliser of a global batch is the sum
of those of its parts: compute them once over the whole accumulated global batch (`ar_loss_normalizers` /
`dit_loss_normalizers` on every micro-batch, summed or `psum`-ed) and pass them to every micro-batch's loss. The
gradient is then independent of how the batch is split over devices and accumulation steps. Without them the
loss normalises over the batch it sees (one micro-batch = the whole step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from glm_jax.sampling.flow import FlowSchedule, kl_fg, mean_kl, transition_std

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
IS_LEVELS = ("token", "sequence")

Metrics = dict[str, jax.Array]


class ArNorm(NamedTuple):
    """Normalisers of the AR loss: `policy` divides the weighted policy term, `kl` the KL term (scalars)."""

    policy: jax.Array
    kl: jax.Array


class DitNorm(NamedTuple):
    """Normalisers of the DiT loss: `policy` = sum_n w_n (#trained steps of n), `kl` = #trained (n, k) pairs."""

    policy: jax.Array
    kl: jax.Array


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _safe_div(num, den):
    den = _f32(den)
    return num / jnp.where(den > 0, den, 1.0)


def _weights(weight, batch: int) -> jax.Array:
    return jnp.ones((batch,), jnp.float32) if weight is None else _f32(weight).reshape(batch)


# the losses' metrics that are `_masked_mean`s over their trained tokens (AR, count `tokens`) or transitions (DiT,
# count `transitions`): the update weights each micro-batch's value by its count (`train_step._reduce_metrics`)
COUNTED_MEANS = frozenset({"clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "kl_mean", "clipfrac",
                           "clipfrac_gt_one", "clipfrac_lt_one", "approx_kl"})


def _masked_mean(x, m):
    return _safe_div(jnp.sum(jnp.where(m, x, 0.0)), jnp.sum(m))


def _masked_min(x, m):
    return jnp.where(jnp.any(m), jnp.min(jnp.where(m, x, jnp.inf)), 0.0)


def _masked_max(x, m):
    return jnp.where(jnp.any(m), jnp.max(jnp.where(m, x, -jnp.inf)), 0.0)


# ------------------------------------------------------------------------------------------------ KL (AR)


def k3(lq_new: jax.Array, lq_ref: jax.Array) -> jax.Array:
    """Schulman's k3 estimator per token, `exp(d) - d - 1` with `d = lq_ref - lq_new` (>= 0, exactly 0 when equal).

    Pass log-probs of the taken tokens under the smooth masked-temperature distribution q = softmax(z~) of the
    policy and of the reference (`ar_sampler.TokenScores.temperature_logprobs`): the processed (nucleus) supports
    of theta and ref differ, so k3 on processed log-probs can be +inf (§2.2). Tokens are samples of the
    processed policy, not of q, so the mean is a penalty rather than an unbiased KL estimate.
    """
    d = _f32(lq_ref) - _f32(lq_new)
    return jnp.exp(d) - d - 1.0


def vocab_kl(lq_new_V: jax.Array, lq_ref_V: jax.Array) -> jax.Array:
    """Exact KL(q_theta || q_ref) `[...]` over the vocabulary axis from full log-prob rows (for logging).

    Ids that are invalid in both rows (`-inf`) contribute 0.
    """
    a, b = _f32(lq_new_V), _f32(lq_ref_V)
    ok = jnp.isfinite(a)
    term = jnp.where(ok, jnp.exp(jnp.where(ok, a, 0.0)) * (jnp.where(ok, a, 0.0) - jnp.where(ok, b, 0.0)), 0.0)
    return jnp.sum(term, axis=-1)


# ------------------------------------------------------------------------------------------------ AR loss


def ar_loss_normalizers(mask: jax.Array, weight: jax.Array | None = None, loss_type: str = "grpo",
                        max_len: int | None = None) -> ArNorm:
    """Normalisers of `ar_policy_loss` for the batch `mask [B, T]` / `weight [B]` (additive over micro-batches).

    grpo: (sum_i w_i, B) - per-sequence means averaged over sequences;
    dapo / bnpo: (sum_i w_i sum_t M_it, sum M) - token means (bnpo = dapo normalised per micro-batch);
    dr_grpo: (sum_i w_i * L_max, B * L_max) with `L_max = max_len` (default T) - a constant per sequence.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    m = _f32(jnp.asarray(mask).astype(bool))
    b, t = m.shape
    w = _weights(weight, b)
    if loss_type == "grpo":
        return ArNorm(jnp.sum(w), _f32(b))
    if loss_type in ("dapo", "bnpo"):
        return ArNorm(jnp.sum(w * jnp.sum(m, axis=1)), jnp.sum(m))
    l_max = t if max_len is None else int(max_len)
    return ArNorm(jnp.sum(w) * l_max, _f32(b * l_max))


def ar_policy_loss(lp_new: jax.Array, lp_old: jax.Array | None, mask: jax.Array, adv: jax.Array,
                   weight: jax.Array | None = None, *, eps_low: float = 0.2, eps_high: float | None = None,
                   loss_type: str = "grpo", is_level: str = "token", beta: float = 0.0,
                   lq_new: jax.Array | None = None, lq_ref: jax.Array | None = None,
                   norm: ArNorm | None = None, max_len: int | None = None,
                   delta: float | None = None) -> tuple[jax.Array, Metrics]:
    """Clipped GRPO loss of AR image tokens (TRL `_compute_loss` semantics, grpo_math §2.3-2.5).

    lp_new, lp_old `[B, T]`: processed-policy log-probs of the taken tokens (trainer forward / rollout);
      `lp_old=None` means `stop_gradient(lp_new)` (one update per rollout: ratio exactly 1).
    mask `[B, T]`: trained positions (preview + target; not prompt, not the final token).
    adv `[B]`: advantages; weight `[B]`: policy-term weights (0 for constant groups; default 1).
    Token ratio r_t = exp(lp_new - lp_old) ("token"), or the GSPO sequence ratio exp(masked mean of the log
    ratio) on every token ("sequence"). Per token
        l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)     (r_t -> min(r_t, delta) in the first term
                                                                       if `delta`: INTELLECT-2 two-sided clip)
    aggregated by `loss_type` with `norm` (default: `ar_loss_normalizers` of this batch), plus
    `beta * k3(lq_new, lq_ref)` aggregated the same way but unweighted (the KL acts on every sample).

    Tokens whose lp_new (or lp_old) is -inf - outside the trainer's nucleus - are dropped from this update
    (masked with `where` before the exp, so no NaN in values or gradients) and counted in `nucleus_miss_rate`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {is_level!r}")
    eps_high = eps_low if eps_high is None else eps_high
    lp_new = _f32(lp_new)
    lp_old = jax.lax.stop_gradient(lp_new) if lp_old is None else _f32(lp_old)
    rollout = jnp.asarray(mask).astype(bool)
    b, t = rollout.shape
    w = _weights(weight, b)
    a = _f32(adv).reshape(b, 1)

    finite = jnp.isfinite(lp_new) & jnp.isfinite(lp_old)
    m = rollout & finite
    miss = rollout & ~finite
    mf = _f32(m)
    n_tok = jnp.sum(mf, axis=1)  # [B]

    log_r = jnp.where(m, lp_new - jnp.where(finite, lp_old, 0.0), 0.0)
    if is_level == "sequence":
        log_r = jnp.broadcast_to((jnp.sum(log_r, axis=1) / jnp.maximum(n_tok, 1.0))[:, None], (b, t))
    ratio = jnp.exp(log_r)
    r1 = ratio if delta is None else jnp.minimum(ratio, delta)
    per_tok = -jnp.minimum(r1 * a, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a)
    per_tok = jnp.where(m, per_tok, 0.0)

    use_kl = lq_new is not None and lq_ref is not None
    kl_tok = jnp.where(m, k3(lq_new, lq_ref), 0.0) if use_kl else jnp.zeros_like(per_tok)

    if norm is None:
        norm = ar_loss_normalizers(m, w, loss_type, max_len)
    pol_i, kl_i = jnp.sum(per_tok, axis=1), jnp.sum(kl_tok, axis=1)
    if loss_type == "grpo":
        pol_i, kl_i = pol_i / jnp.maximum(n_tok, 1.0), kl_i / jnp.maximum(n_tok, 1.0)
    policy = _safe_div(jnp.sum(w * pol_i), norm.policy)
    kl = _safe_div(jnp.sum(kl_i), norm.kl)
    loss = policy + beta * kl if use_kl else policy

    sg = jax.lax.stop_gradient
    r, av = sg(ratio), jnp.broadcast_to(sg(a), (b, t))
    low = (r < 1.0 - eps_low) & (av < 0)
    high = (r > 1.0 + eps_high) & (av > 0)
    metrics = {
        "policy_loss": sg(policy),
        "kl_loss": sg(kl),
        "clip_frac_low": _masked_mean(_f32(low), m),
        "clip_frac_high": _masked_mean(_f32(high), m),
        "clip_frac": _masked_mean(_f32(low | high), m),
        "ratio_mean": _masked_mean(r, m),
        "ratio_min": _masked_min(r, m),
        "ratio_max": _masked_max(r, m),
        "kl_mean": _masked_mean(sg(kl_tok), m),
        "nucleus_miss_rate": _safe_div(jnp.sum(_f32(miss)), jnp.sum(_f32(rollout))),
        "tokens": jnp.sum(mf),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------- DiT loss


def dit_loss_normalizers(step_mask: jax.Array, weight: jax.Array | None = None) -> DitNorm:
    """`DitNorm` of a batch `step_mask [B, K]` / `weight [B]` (additive over micro-batches)."""
    m = _f32(jnp.asarray(step_mask).astype(bool))
    w = _weights(weight, m.shape[0])
    return DitNorm(jnp.sum(w[:, None] * m), jnp.sum(m))


def dit_policy_loss(lp_new: jax.Array, lp_old: jax.Array | None, adv: jax.Array, weight: jax.Array | None = None,
                    *, clip_range: float = 1e-4, adv_clip: float | None = 5.0,
                    step_mask: jax.Array | None = None, beta: float = 0.0, kl_terms: jax.Array | None = None,
                    norm: DitNorm | None = None) -> tuple[jax.Array, Metrics]:
    """Flow-GRPO loss of the DiT (grpo_math §3.4): mean over (samples, trained steps) of
        l_nk = max(-A_n r_nk, -A_n clip(r_nk, 1 - eps, 1 + eps)),  r_nk = exp(lp_new - lp_old),  A = clip(adv, +-c)
    weighted by `weight [B]` (0 for constant groups), plus `beta * mean(kl_terms)` over the trained steps.

    lp_new, lp_old `[B, K]`: per-step log-probs (`flow.step_logprob` at replay / the rollout's stored lp);
      `lp_old=None` means `stop_gradient(lp_new)`. step_mask `[B, K]`: trained steps (default all); entries
      outside it are ignored (never exp-ed). kl_terms `[B, K]`: per-step KL, e.g. `dit_kl(...).fg` (Flow-GRPO's
      convention, so its beta values transfer). `norm`: global `DitNorm` (default: this batch's).
    """
    lp_new = _f32(lp_new)
    lp_old = jax.lax.stop_gradient(lp_new) if lp_old is None else _f32(lp_old)
    b, k = lp_new.shape
    m = jnp.ones((b, k), bool) if step_mask is None else jnp.asarray(step_mask).astype(bool)
    w = _weights(weight, b)
    a = _f32(adv).reshape(b, 1)
    if adv_clip is not None:
        a = jnp.clip(a, -adv_clip, adv_clip)

    log_r = jnp.where(m, lp_new - jnp.where(m, lp_old, 0.0), 0.0)
    ratio = jnp.exp(log_r)
    per = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range))
    per = jnp.where(m, per, 0.0)
    if norm is None:
        norm = dit_loss_normalizers(m, w)
    policy = _safe_div(jnp.sum(w[:, None] * per), norm.policy)
    use_kl = kl_terms is not None
    kl = _safe_div(jnp.sum(jnp.where(m, _f32(kl_terms), 0.0)), norm.kl) if use_kl else jnp.zeros((), jnp.float32)
    loss = policy + beta * kl if use_kl else policy

    sg = jax.lax.stop_gradient
    r, lr = sg(ratio), sg(log_r)
    metrics = {
        "policy_loss": sg(policy),
        "kl_loss": sg(kl),
        "clipfrac": _masked_mean(_f32(jnp.abs(r - 1.0) > clip_range), m),
        "clipfrac_gt_one": _masked_mean(_f32(r - 1.0 > clip_range), m),
        "clipfrac_lt_one": _masked_mean(_f32(1.0 - r > clip_range), m),
        "approx_kl": 0.5 * _masked_mean(lr * lr, m),
        "ratio_mean": _masked_mean(r, m),
        "ratio_min": _masked_min(r, m),
        "ratio_max": _masked_max(r, m),
        "transitions": jnp.sum(_f32(m)),
    }
    return loss, metrics


# ------------------------------------------------------------------------------------------------ KL (DiT)


class DitKL(NamedTuple):
    """Per-sample KL of one DiT step `[B]`: Flow-GRPO's convention (`fg`, divides by std_dev_t^2; the beta
    convention) and the exact Gaussian KL (`exact`, divides by s_k^2; for logging)."""

    fg: jax.Array
    exact: jax.Array


def dit_kl(mean_theta: jax.Array, mean_ref: jax.Array, sched: FlowSchedule, k: Any, noise_level: Any,
           kernel: str = "sde") -> DitKL:
    """Both KLs of step `k` (int or `[B]`) between the transition means of theta and the reference
    (`sampling.flow`). Only for SDE steps (s_k > 0)."""
    _, s_k = transition_std(sched, k, noise_level, kernel)
    return DitKL(kl_fg(mean_theta, mean_ref, sched, k, noise_level, kernel), mean_kl(mean_theta, mean_ref, s_k))


def velocity_mse(v_theta: jax.Array, v_ref: jax.Array) -> jax.Array:
    """Per-sample `mean_d (v_theta - v_ref)^2` `[B]` (the "velocity KL", logged beside the Gaussian KLs)."""
    d = _f32(v_theta) - _f32(v_ref)
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))
