"""GRPO advantages: per-group reward normalisation (`design/grpo_math.md` §1).

Two implementations of the same rule:

* `compute_advantages` (numpy, float64): the spec's path. Run it on the host after an all-gather of
  `(rewards, group_ids)` over every host, so groups may straddle devices and every host gets identical
  advantages. Handles several reward components (dict of `[B]` arrays) and both aggregations.
* `group_advantages_jnp` (jax, jit-friendly, static shapes): a single reward `[B]`, for use inside a jitted step.

Rule, for group g (explicit integer ids; the mean is always per group, only the scale varies):

    A_n = clip((R_n - m_g) / (S + eps), -clip, clip)
    S = std_g (scale "group") | std over the whole gathered batch ("batch") | 1 with eps = 0 ("none")

std with ddof 0, eps = 1e-4. A group whose applicable rewards are all equal (`max - min == 0`, an exact test
before any division) gets A = 0 exactly and policy weight w = 0 (floating-point means are not exact, so the
division alone would leak values like 1e-13). NaN rewards mean "not applicable": they are left out of every
statistic and get A = 0, w = 0. If every group has a single member (G = 1) the whole batch is one group.

Never mix AR and DiT rewards in one z-score: call this once for the AR reward set (AR groups) and once for the
DiT reward set (DiT groups, one AR sample each), §1.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
DEFAULT_EPS = 1e-4
DEFAULT_CLIP = 5.0


class Advantages(NamedTuple):
    """Advantages `[B]` and policy-loss weights `[B]` (float32; w = 0 for constant groups and NaN rewards), plus
    scalar metrics for logging."""

    advantages: Any
    weights: Any
    metrics: dict[str, Any]


class _GroupStats(NamedTuple):
    advantages: Any     # [B], unclipped, 0 where inactive
    active: Any         # [B] bool: applicable reward in a non-constant group
    mean_g: Any         # [n]
    std_g: Any          # [n]
    count_g: Any        # [n] applicable rewards per group
    constant_g: Any     # [n] max == min over the applicable rewards (or none applicable)
    batch_std: Any      # scalar


# ------------------------------------------------------------------------------------------ segment ops


class _Numpy:
    """Segment reductions over group indices in numpy."""

    xp = np

    @staticmethod
    def seg_sum(x, inv, n):
        return np.bincount(inv, weights=x, minlength=n).astype(x.dtype)

    @staticmethod
    def seg_max(x, inv, n):
        out = np.full(n, -np.inf, x.dtype)
        np.maximum.at(out, inv, x)
        return out

    @staticmethod
    def seg_min(x, inv, n):
        out = np.full(n, np.inf, x.dtype)
        np.minimum.at(out, inv, x)
        return out


class _Jax:
    """Segment reductions over group indices in jax (static `n`)."""

    xp = jnp

    @staticmethod
    def seg_sum(x, inv, n):
        return jax.ops.segment_sum(x, inv, num_segments=n)

    @staticmethod
    def seg_max(x, inv, n):
        return jax.ops.segment_max(x, inv, num_segments=n)

    @staticmethod
    def seg_min(x, inv, n):
        return jax.ops.segment_min(x, inv, num_segments=n)


def _normalize(ops, r, inv, n: int, scale: str, eps: float) -> _GroupStats:
    """Core rule on one reward vector `r [B]` (NaN = not applicable) with group indices `inv` in `[0, n)`."""
    xp = ops.xp
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    # G = 1 fallback: when every group holds one sample, normalise over the batch as a single group
    size_g = ops.seg_sum(xp.ones_like(r), inv, n)
    inv = xp.where(xp.max(size_g) <= 1, xp.zeros_like(inv), inv)

    valid = ~xp.isnan(r)
    rv = xp.where(valid, r, 0)
    count_g = ops.seg_sum(valid.astype(r.dtype), inv, n)
    mean_g = ops.seg_sum(rv, inv, n) / xp.maximum(count_g, 1)
    hi = ops.seg_max(xp.where(valid, r, -xp.inf), inv, n)
    lo = ops.seg_min(xp.where(valid, r, xp.inf), inv, n)
    constant_g = (hi == lo) | (count_g == 0)
    dev = xp.where(valid, r - mean_g[inv], 0)
    std_g = xp.sqrt(ops.seg_sum(dev * dev, inv, n) / xp.maximum(count_g, 1))

    n_valid = xp.sum(valid.astype(r.dtype))
    batch_mean = xp.sum(rv) / xp.maximum(n_valid, 1)
    batch_std = xp.sqrt(xp.sum(xp.where(valid, (r - batch_mean) ** 2, 0)) / xp.maximum(n_valid, 1))

    if scale == "group":
        denom = std_g[inv] + eps
    elif scale == "batch":
        denom = batch_std + eps
    else:  # "none" (Dr.GRPO): no scaling, no epsilon
        denom = xp.ones_like(r)
    active = valid & ~constant_g[inv]
    adv = xp.where(active, dev / xp.where(active, denom, 1), 0)
    return _GroupStats(adv, active, mean_g, std_g, count_g, constant_g, batch_std)


def _group_metrics(xp, st: _GroupStats) -> dict[str, Any]:
    present = st.count_g > 0
    n_present = xp.maximum(xp.sum(present), 1)
    return {
        "zero_std_ratio": xp.sum(st.constant_g & present) / n_present,
        "reward_std_mean": xp.sum(xp.where(present, st.std_g, 0)) / n_present,
        "batch_std": st.batch_std,
    }


def _clip(xp, a, clip: float | None):
    return a if clip is None else xp.clip(a, -clip, clip)


# ------------------------------------------------------------------------------------------------ numpy


def _as_components(rewards) -> dict[str, np.ndarray]:
    if isinstance(rewards, Mapping):
        comps = {k: np.asarray(v, np.float64).reshape(-1) for k, v in rewards.items()}
    else:
        comps = {"reward": np.asarray(rewards, np.float64).reshape(-1)}
    if not comps:
        raise ValueError("no reward components")
    sizes = {v.shape[0] for v in comps.values()}
    if len(sizes) != 1:
        raise ValueError(f"reward components have different lengths: { {k: v.shape for k, v in comps.items()} }")
    return comps


def _weighted_sum(values: dict[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """`sum_j w_j x_j` over the non-NaN components of each sample; NaN where all are NaN."""
    x = np.stack([values[k] for k in values])
    w = np.asarray([float(weights.get(k, 1.0)) for k in values], np.float64)[:, None]
    ok = ~np.isnan(x)
    total = np.where(ok, w * np.where(ok, x, 0.0), 0.0).sum(axis=0)
    return np.where(ok.any(axis=0), total, np.nan)


def compute_advantages(rewards: Mapping[str, Any] | Any, group_ids: Any | None, *,
                       reward_weights: Mapping[str, float] | None = None, scale_rewards: str = "group",
                       aggregation: str = "sum_then_normalize", eps: float = DEFAULT_EPS,
                       clip: float | None = DEFAULT_CLIP) -> Advantages:
    """Host-side float64 advantages of a gathered batch (grpo_math §1.1-1.4).

    `rewards`: `[B]` array or dict name -> `[B]` (NaN = not applicable); `group_ids`: `[B]` integers (any values;
    None = one sample per group, i.e. batch normalisation); `reward_weights`: name -> weight (default 1).
    `aggregation`:
      * "sum_then_normalize": R_n = sum_j w_j R_nj over applicable components (NaN if none), then the group rule.
      * "normalize_then_sum" (GDPO): per component and group z-scores (R_j - m_g^j) / (S_j + eps), weighted sum
        over applicable components, then a z-score over the whole batch; a group where every component is
        constant gets A = 0, w = 0.
    Returns float32 advantages (clipped to +-clip; None disables), float32 weights and float metrics.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    comps = _as_components(rewards)
    weights = dict(reward_weights or {})
    b = next(iter(comps.values())).shape[0]
    gid = np.arange(b) if group_ids is None else np.asarray(group_ids).reshape(-1)
    if gid.shape[0] != b:
        raise ValueError(f"group_ids has {gid.shape[0]} entries for {b} rewards")
    if not np.issubdtype(gid.dtype, np.integer):
        raise TypeError(f"group_ids must be integers, got {gid.dtype}")
    _, inv = np.unique(gid, return_inverse=True)
    inv = inv.reshape(-1)
    n = int(inv.max()) + 1 if b else 0
    ops = _Numpy

    if aggregation == "sum_then_normalize":
        total = _weighted_sum(comps, weights)
        st = _normalize(ops, total, inv, n, scale_rewards, eps)
        adv, active = st.advantages, st.active
        metrics = _group_metrics(np, st)
    else:
        z = {}
        any_active = np.zeros(b, bool)
        for k, r in comps.items():
            sk = _normalize(ops, r, inv, n, scale_rewards, eps)
            z[k] = np.where(np.isnan(r), np.nan, sk.advantages)
            any_active |= sk.active
        total = _weighted_sum(z, weights)
        valid = ~np.isnan(total)
        st = _normalize(ops, total, np.zeros(b, np.int64), 1, "group", eps)
        adv = np.where(any_active, st.advantages, 0.0)
        active = valid & any_active
        # group-level logs on the weighted raw rewards
        total = _weighted_sum(comps, weights)
        metrics = _group_metrics(np, _normalize(ops, total, inv, n, "group", eps))
        metrics["zero_std_ratio"] = 1.0 - _fraction_groups_active(active, valid, inv, n)

    adv_c = _clip(np, adv, clip)
    metrics.update(_reward_metrics(comps, total, adv, adv_c, active))
    metrics = {k: float(v) for k, v in metrics.items()}
    return Advantages(adv_c.astype(np.float32), active.astype(np.float32), metrics)


def _fraction_groups_active(active, valid, inv, n) -> float:
    has_valid = np.bincount(inv, weights=valid, minlength=n) > 0
    has_active = np.bincount(inv, weights=active, minlength=n) > 0
    return float(has_active.sum() / max(has_valid.sum(), 1))


def _nanstat(f, x) -> float:
    x = x[~np.isnan(x)]
    return float(f(x)) if x.size else float("nan")


def _reward_metrics(comps, total, adv, adv_c, active) -> dict[str, float]:
    out = {
        "reward_mean": _nanstat(np.mean, total),
        "reward_std": _nanstat(np.std, total),
        "nan_frac": float(np.isnan(total).mean()) if total.size else 0.0,
        "active_frac": float(active.mean()) if active.size else 0.0,
        "adv_abs_mean": float(np.abs(adv_c).mean()) if adv_c.size else 0.0,
        "adv_clip_frac": float((adv_c != adv).mean()) if adv.size else 0.0,
    }
    for k, r in comps.items():
        out[f"{k}/mean"] = _nanstat(np.mean, r)
        out[f"{k}/std"] = _nanstat(np.std, r)
        out[f"{k}/nan_frac"] = float(np.isnan(r).mean()) if r.size else 0.0
    return out


def parent_mean(rewards: Any, parent_ids: Any) -> np.ndarray:
    """Mean reward over the children of each parent, returned per parent in `np.unique(parent_ids)` order.

    For the nested rollout (§1.5): the AR reward of AR sample k is the mean over its G_dit DiT children, which
    lowers the decoder noise in the AR signal. NaN children are skipped; a parent with only NaN gets NaN.
    """
    r = np.asarray(rewards, np.float64).reshape(-1)
    _, inv = np.unique(np.asarray(parent_ids).reshape(-1), return_inverse=True)
    inv = inv.reshape(-1)
    ok = ~np.isnan(r)
    cnt = np.bincount(inv, weights=ok)
    s = np.bincount(inv, weights=np.where(ok, r, 0.0))
    return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


# -------------------------------------------------------------------------------------------------- jax


def group_advantages_jnp(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None = None, *,
                         scale_rewards: str = "group", eps: float = DEFAULT_EPS,
                         clip: float | None = DEFAULT_CLIP) -> Advantages:
    """The same rule in jax for one reward vector `[B]` (NaN = not applicable), usable inside `jax.jit`.

    `group_ids` are integers in `[0, num_groups)` (static `num_groups`, default B); unused ids are ignored.
    Computes in the rewards' float dtype (float32 unless x64 is on); the zero-std test is exact in any dtype.
    `scale_rewards="batch"` uses the batch that this call sees, so call it on the gathered batch.
    """
    r = jnp.asarray(rewards)
    if not jnp.issubdtype(r.dtype, jnp.floating):
        r = r.astype(jnp.float32)
    r = r.reshape(-1)
    n = r.shape[0] if num_groups is None else int(num_groups)
    inv = jnp.asarray(group_ids, jnp.int32).reshape(-1)
    st = _normalize(_Jax, r, inv, n, scale_rewards, eps)
    adv = _clip(jnp, st.advantages, clip)
    metrics = _group_metrics(jnp, st)
    return Advantages(adv.astype(jnp.float32), st.active.astype(jnp.float32), metrics)
