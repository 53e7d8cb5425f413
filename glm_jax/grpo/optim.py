"""Optimizers of the GRPO trainer: AdamW with linear warmup + cosine decay and global-norm clipping, one per
trained component (the AR and the DiT each get their own learning rate and schedule, grpo_math §6.12).

The optimizer state is float32 whatever the parameter dtype: `fp32_state` wraps a transformation so that it sees
float32 gradients and parameters (its moments are float32) and hands back updates in each parameter's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimConfig:
    """One component's optimizer: peak `lr`, `warmup_steps` of linear warmup from 0, cosine decay to
    `lr * final_lr_ratio` at `total_steps` (0 = constant after warmup), AdamW `b1`, `b2`, `eps`,
    `weight_decay`, and global-norm clipping at `grad_clip` (0 = off)."""

    lr: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    @classmethod
    def from_config(cls, section, total_steps: int = 0) -> OptimConfig:
        """From a `config.ar` / `config.dit` section (`lr`, `warmup_steps`, `weight_decay`, `grad_clip`, `b1`,
        `b2`) and the run length."""
        return cls(lr=float(section.lr), warmup_steps=int(section.warmup_steps), total_steps=int(total_steps),
                   b1=float(section.b1), b2=float(section.b2), weight_decay=float(section.weight_decay),
                   grad_clip=float(section.grad_clip))


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """`lr(step)`: linear warmup `lr * (step + 1) / warmup` for `step < warmup`, then cosine decay from `lr`
    to `lr * final_lr_ratio` over the remaining `total_steps - warmup` steps (constant if `total_steps` is 0)."""
    peak, warm = float(cfg.lr), int(cfg.warmup_steps)
    decay = max(int(cfg.total_steps) - warm, 0)
    floor = peak * float(cfg.final_lr_ratio)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm_lr = peak * jnp.minimum(1.0, (step + 1.0) / max(warm, 1))
        if decay == 0:
            return jnp.where(step < warm, warm_lr, peak)
        t = jnp.clip((step - warm) / decay, 0.0, 1.0)
        cos_lr = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(step < warm, warm_lr, cos_lr)

    return fn


def cast_floating(tree, dtype):
    """`tree` with its floating-point leaves in `dtype` (leaves already in it, and integer leaves, unchanged)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
                        else x, tree)


def fp32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run in float32: state initialised from float32 copies of the params, gradients and params cast to
    float32 before the update, updates cast back to each parameter's dtype."""

    def f32(tree):
        return cast_floating(tree, jnp.float32)

    def init(params):
        return tx.init(f32(params))

    def update(grads, state, params=None):
        updates, state = tx.update(f32(grads), state, None if params is None else f32(params))
        ref = grads if params is None else params
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, ref), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clip -> AdamW(lr schedule) with float32 state (`fp32_state`)."""
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return fp32_state(optax.chain(*parts))
