"""Exponential moving average (EMA) of the trained parameters, for evaluation and export.

    ema = ema_init(params)                                  # float32 copy of the trained params
    ema = ema_maybe_update(ema, params, step, decay=0.9, every=8)

Every `every`-th step (`step % every == 0`, steps counted from 1) the average moves towards the current params:

    ema <- decay * ema + (1 - decay) * params          (float32, whatever the params' dtype)

so after k updates with params p_1 .. p_k, starting from p_0 (the params when training started):

    ema_k = decay^k p_0 + (1 - decay) * sum_{i=1..k} decay^(k-i) p_i

**Bias.** The average starts at the initial params, not at zero, so its weights always sum to one
(`decay^k + (1 - decay) sum decay^(k-i) = 1`) and no bias correction is applied (Adam-style correction is only needed
for a zero start). Early on the EMA therefore stays close to the starting model; with `decay = 0.9` and
`every = 8` the starting point's weight falls below 5% after 29 updates (232 steps). `decay = 0` disables the EMA
(the trainer then keeps no copy). On resume the EMA is restored from the checkpoint with the rest of the state.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp


def ema_init(params: Any) -> Any:
    """A float32 copy of `params` (a pytree of arrays): the EMA before any update."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


@partial(jax.jit, donate_argnums=0)
def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """One EMA step `decay * ema + (1 - decay) * params` in float32 (the old EMA buffers are donated)."""
    d = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params)


def ema_due(step: int, every: int) -> bool:
    """Whether the EMA is updated after training step `step` (1-based): every `every`-th step."""
    return step % max(int(every), 1) == 0


def ema_maybe_update(ema: Any, params: Any, step: int, *, decay: float, every: int) -> Any:
    """`ema_update(ema, params, decay)` when `ema_due(step, every)`, else `ema` unchanged."""
    if not ema_due(step, every):
        return ema
    return ema_update(ema, params, jnp.float32(decay))


def ema_as(ema: Any, like: Any) -> Any:
    """The EMA cast to the dtypes of `like` (the trained params), e.g. to run or export it as the model."""
    return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, like)


__all__ = ["ema_as", "ema_due", "ema_init", "ema_maybe_update", "ema_update"]
