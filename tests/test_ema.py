"""EMA of the trained parameters: the closed form after k updates, the `every` interval, dtypes, no bias."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.ema import ema_as, ema_due, ema_init, ema_maybe_update


def _params(rng, dtype=np.float32):
    return {"a": jnp.asarray(rng.normal(size=(3, 5)).astype(dtype)),
            "b": {"c": jnp.asarray(rng.normal(size=(7,)).astype(dtype))}}


@pytest.mark.parametrize("decay,every,steps", [(0.9, 1, 6), (0.7, 3, 11), (0.995, 2, 9)])
def test_closed_form_after_k_updates(decay, every, steps):
    rng = np.random.default_rng(int(decay * 1000) + every)
    p0 = _params(rng)
    ema = ema_init(p0)
    seq = [_params(rng) for _ in range(steps)]            # params after training steps 1..steps
    for s, p in enumerate(seq, start=1):
        ema = ema_maybe_update(ema, p, s, decay=decay, every=every)
    used = [seq[s - 1] for s in range(1, steps + 1) if s % every == 0]
    k = len(used)
    for path in (("a",), ("b", "c")):
        def get(t, path=path):
            for key in path:
                t = t[key]
            return np.asarray(t, np.float64)
        want = decay ** k * get(p0) + (1 - decay) * sum(decay ** (k - i) * get(p) for i, p in
                                                        enumerate(used, start=1))
        np.testing.assert_allclose(get(ema), want, rtol=2e-6, atol=2e-6)
    # weights sum to one: a constant parameter stays exactly where it is (no bias towards zero)
    const = {"a": jnp.full((4,), 2.5, jnp.float32)}
    e = ema_init(const)
    for s in range(1, 20):
        e = ema_maybe_update(e, const, s, decay=decay, every=every)
    np.testing.assert_allclose(np.asarray(e["a"]), 2.5, rtol=1e-6)


def test_every_is_respected_and_off_steps_leave_it_unchanged():
    rng = np.random.default_rng(0)
    p0, p1 = _params(rng), _params(rng)
    ema = ema_init(p0)
    assert [s for s in range(1, 13) if ema_due(s, 4)] == [4, 8, 12]
    for s in (1, 2, 3):
        ema = ema_maybe_update(ema, p1, s, decay=0.5, every=4)
        np.testing.assert_array_equal(np.asarray(ema["a"]), np.asarray(p0["a"]))
    ema = ema_maybe_update(ema, p1, 4, decay=0.5, every=4)
    np.testing.assert_allclose(np.asarray(ema["a"]), 0.5 * np.asarray(p0["a"]) + 0.5 * np.asarray(p1["a"]),
                               rtol=1e-6)


def test_float32_state_for_bf16_params_and_cast_back():
    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.normal(size=(6, 2)), jnp.bfloat16)}
    ema = ema_init(p)
    assert ema["w"].dtype == jnp.float32
    q = {"w": (p["w"].astype(jnp.float32) * 1.5).astype(jnp.bfloat16)}
    ema2 = ema_maybe_update(ema, q, 1, decay=0.99, every=1)
    assert ema2["w"].dtype == jnp.float32
    want = 0.99 * np.asarray(p["w"], np.float32) + 0.01 * np.asarray(q["w"], np.float32)
    np.testing.assert_allclose(np.asarray(ema2["w"]), want, rtol=1e-6)   # finer than bf16 resolution
    assert ema_as(ema2, p)["w"].dtype == jnp.bfloat16
