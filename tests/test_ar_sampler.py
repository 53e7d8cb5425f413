"""AR sampler: the processed policy equals transformers' warpers, teacher-forced log-probs equal transformers'
forward + warpers, sampler log-probs equal re-scoring, and the draws follow exp(log pi) (chi-square)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.glm_image.processing_glm_image import GlmImageProcessor

from conversion.apply import load_state_dict_into
from conversion.tables.ar import TEXT_RULES
from glm_jax.models import positions as P
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.sampling.ar_sampler import (
    ArLayout,
    SamplingParams,
    draw_token,
    masked_temperature_logprobs,
    processed_logprobs,
    sample_ar,
    score_tokens,
    score_tokens_jit,
    slot_valid_mask,
)
from tests.test_positions import i2i_prompt, left_pad, t2i_prompt
from tests.tiny_torch import N_CODES, ar_config_dict, tiny_ar
from tests.util import jaxpr_eqns, rel_err, torch_to_numpy_state

# The tiny lm_head has 128 rows (= tiny_torch.N_CODES) and its EOS (129) is not one of them, so the RL restriction
# is exercised with a smaller code range and an EOS row inside the head: codes 0..111 valid, 112..127 masked.
CODES, EOS_RL = 112, 125
PARAMS = SamplingParams()  # 0.9 / 16512 / 0.75, as the real generation_config
LAYOUT = ArLayout.t2i(64, 96)  # target 2x3, preview 13x19 (HF processor formula)


def hf_warpers(p: SamplingParams, vocab: int) -> LogitsProcessorList:
    ws = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k is not None:
        ws.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        ws.append(TopPLogitsWarper(p.top_p))
    return LogitsProcessorList(ws)


def hf_processed(logits: np.ndarray, valid: np.ndarray, p: SamplingParams) -> np.ndarray:
    """transformers' processed log-probs of `[R, V]` fp32 logits with invalid ids set to -inf first."""
    x = torch.tensor(np.where(valid, logits, -np.inf), dtype=torch.float32)
    out = hf_warpers(p, x.shape[-1])(None, x)
    return torch.log_softmax(out, dim=-1).numpy()


# ---------------------------------------------------------------------------------------------------------------
# processed policy on random logits


def test_layout_matches_hf_processor():
    for h, w in [(64, 96), (1024, 1024), (1024, 1152), (2048, 512), (96, 64)]:
        th, tw, ph, pw = GlmImageProcessor._get_target_shape(None, h, w)
        lay = ArLayout.t2i(h, w)
        assert (lay.target, lay.preview) == ((th, tw), (ph, pw))
        assert lay.n_tokens == ph * pw + th * tw + 1
        assert lay.image_grid_thw == [[1, th, tw], [1, ph, pw]]
    assert ArLayout.t2i(1024, 1024).n_tokens == 1281 and ArLayout.i2i(1024, 1024).n_tokens == 1025
    with pytest.raises(ValueError, match="multiples of 32"):
        ArLayout.t2i(100, 96)


@pytest.mark.parametrize("p, masked", [
    (SamplingParams(), False),
    (SamplingParams(), True),
    (SamplingParams(temperature=0.7, top_k=40, top_p=0.75), True),
    (SamplingParams(temperature=1.3, top_k=5, top_p=0.95), False),  # top-k smaller than the nucleus
    (SamplingParams(temperature=0.9, top_k=7, top_p=1.0), False),  # top-k only
])
def test_processed_logprobs_equal_hf_warpers(p, masked):
    rng = np.random.default_rng(hash((p.top_k, p.top_p, masked)) % 2**32)
    v = 301
    logits = (rng.standard_normal((48, v)) * rng.uniform(0.5, 4.0, (48, 1))).astype(np.float32)
    logits[0, 17] = 40.0  # min-keep: one token holds > top_p of the mass, every other token is dropped
    logits[1, :] = 0.5  # all equal (top-k ties: all kept by the k-th value rule)
    valid = rng.random((48, v)) < 0.8 if masked else np.ones((48, v), bool)
    valid[0, 17] = True
    ref = hf_processed(logits, valid, p)
    got = np.asarray(processed_logprobs(jnp.asarray(logits), jnp.asarray(valid), p))
    kept = np.isfinite(got)
    non_tie = np.arange(48) != 1
    np.testing.assert_array_equal(kept[non_tie], np.isfinite(ref)[non_tie])
    np.testing.assert_allclose(got[kept & non_tie[:, None]], ref[kept & non_tie[:, None]], atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-6)  # T8: sums to one over the kept set
    assert not np.any(kept & ~valid)
    if p.top_p < 1:
        assert kept[0].sum() == 1 and kept[0, 17]
    if p.top_p == 1.0:
        assert kept[1].all()  # all tied at the k-th value: top-k keeps all of them
    lq = np.asarray(masked_temperature_logprobs(jnp.asarray(logits), jnp.asarray(valid), p))
    ref_q = torch.log_softmax(torch.tensor(np.where(valid, logits, -np.inf)) / p.temperature, -1).numpy()
    np.testing.assert_allclose(lq[valid], ref_q[valid], atol=2e-6, rtol=1e-6)
    assert np.all(np.isneginf(lq[~valid]))


@pytest.mark.parametrize("p", [SamplingParams(), SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
                               SamplingParams(temperature=1.0, top_k=None, top_p=0.5)])
def test_16bit_logits_are_processed_exactly_as_their_fp32_values(p):
    """bf16 logits (as the model's head gives them) take a cheaper path: their own values are sorted instead of the
    fp32 masked-temperature logits. The log-probs must be bit for bit those of the same values given in fp32,
    with many ties (bf16 has 8 significant bits) and a lattice row whose tied groups straddle the boundary."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, 1024)) * rng.uniform(0.5, 6.0, (64, 1))
    logits[:8] = rng.integers(0, 7, (8, 1024)) * 0.5
    logits = jnp.asarray(logits, jnp.bfloat16)
    valid = jnp.asarray(rng.random(1024) < 0.9)
    got = np.asarray(processed_logprobs(logits, valid, p))
    want = np.asarray(processed_logprobs(logits.astype(jnp.float32), valid, p))
    np.testing.assert_array_equal(got, want)
    kept = np.isfinite(got)
    assert 1 <= kept.sum(-1).min() and kept.sum(-1).max() < valid.sum()   # the nucleus really cuts


def _divided_operands(jaxpr, prims: set[str]) -> list[str]:
    """Equations of `prims` (sub-jaxprs included) with an operand whose value was computed from a division: a value
    that can differ in the last bit between two fusions of one program (on a GPU, a Triton fusion's float32
    division is not correctly rounded). Values picked by a gather or a select whose index or predicate came from a
    division are exact (elements of their operands) and stay clean."""
    import jax.extend.core
    found = []

    def walk(jx, tainted_in) -> list[bool]:
        tainted = {v for v, t in zip(jx.invars, tainted_in, strict=True) if t}

        def is_t(v):
            return not isinstance(v, jax.extend.core.Literal) and v in tainted
        for eqn in jx.eqns:
            ins = [is_t(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in prims and any(ins):
                found.append(name)
            subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
            if name == "div":
                outs = [True] * len(eqn.outvars)
            elif name == "select_n":     # the predicate picks among the cases' values
                outs = [any(ins[1:])] * len(eqn.outvars)
            elif name == "gather":       # the indices pick the operand's values
                outs = [ins[0]] * len(eqn.outvars)
            elif len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):   # a call: follow it
                outs = walk(subs[0], ins)
            else:
                t = any(ins) or any(e.primitive.name == "div" for sub in subs for e in jaxpr_eqns(sub))
                outs = [t] * len(eqn.outvars)
            tainted.update(v for v, t in zip(eqn.outvars, outs, strict=True) if t)
        return [is_t(v) for v in jx.outvars]

    walk(jaxpr.jaxpr, [False] * len(jaxpr.jaxpr.invars))
    return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kept_set_is_found_on_exact_keys(dtype):
    """The kept set is sorted for and compared on the logits themselves, never on a recomputed division: the
    re-scoring's backward pass rebuilds it from saved bounds, and where the masked-temperature logits z~ = logits / T
    came out one bit lower there than in the sort (two fusions, two codes), the boundary token fell out of the kept
    set at every position (an AR gradient 5% off on a GPU)."""
    logits = jnp.zeros((4, 64), dtype)
    valid = jnp.arange(64) < 60
    jaxpr = jax.make_jaxpr(lambda x: processed_logprobs(x, valid, PARAMS))(logits)
    assert any(e.primitive.name == "sort" for e in jaxpr_eqns(jaxpr.jaxpr))
    assert any(e.primitive.name == "div" for e in jaxpr_eqns(jaxpr.jaxpr))   # z~ is there, for the values
    # (the nucleus sum's own `cum <= 1 - top_p`, a `le` on z~, is evaluated once, in the forward pass: its result
    # is saved in the bounds)
    assert _divided_operands(jaxpr, {"sort", "eq", "gt", "ge", "lt"}) == []


def test_nucleus_boundary_ties(monkeypatch):
    """Logits on a coarse lattice, so groups of equal values straddle the top-p boundary. transformers' default
    (unstable) sort keeps the same number of tied tokens with the same probabilities; with a stable sort the kept
    set is exactly ours (the highest-index members of the boundary group)."""
    rng = np.random.default_rng(11)
    logits = (rng.integers(0, 7, (64, 250)) * 0.45).astype(np.float32)
    valid = np.ones_like(logits, bool)
    got = np.asarray(processed_logprobs(jnp.asarray(logits), jnp.asarray(valid), PARAMS))
    kept = np.isfinite(got)
    ref = hf_processed(logits, valid, PARAMS)
    ref_kept = np.isfinite(ref)
    np.testing.assert_array_equal(kept.sum(-1), ref_kept.sum(-1))
    np.testing.assert_allclose(np.sort(got, -1), np.sort(ref, -1), atol=2e-6, rtol=0)
    straddle = 0
    for r in range(logits.shape[0]):
        thr = logits[r][kept[r]].min()
        group = logits[r] == thr
        np.testing.assert_array_equal(kept[r][~group], ref_kept[r][~group])
        idx = np.nonzero(group)[0]
        n_kept = kept[r][group].sum()
        assert kept[r][idx[len(idx) - n_kept:]].all()  # the highest indices of the group
        straddle += 0 < n_kept < len(idx)
    assert straddle > 30  # the test really has boundary ties

    original = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: original(x, *a, **{**k, "stable": True}))
    ref_stable = hf_processed(logits, valid, PARAMS)
    np.testing.assert_array_equal(kept, np.isfinite(ref_stable))
    np.testing.assert_allclose(got[kept], ref_stable[kept], atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the tiny model, a left-padded t2i batch


@pytest.fixture(scope="module")
def hf():
    return tiny_ar(5)


@pytest.fixture(scope="module")
def model(hf):
    m = GlmImageAR(ArConfig.from_hf(ar_config_dict()), rngs=nnx.Rngs(0), with_vision=False)
    return load_state_dict_into(m, torch_to_numpy_state(hf), TEXT_RULES,
                                ignore=lambda k: k.startswith(("model.visual.", "model.vqmodel.")))


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


def prompt_batch(model, seqs_grids, layout):
    seqs = [s for s, _ in seqs_grids]
    grids = [g for _, g in seqs_grids]
    ids, mask = left_pad(seqs)
    cfg = model.cfg
    pos, start = P.prompt_position_ids(ids, mask, grids, cfg)
    gen = P.generation_grids(ids, mask, grids, cfg)
    assert all(g == layout.gen_grids for g in gen)
    return ids, mask, pos, P.decode_position_ids(start, gen)


@pytest.fixture(scope="module")
def batch(model):
    """Two different t2i prompts (64x96 target), each twice, left-padded."""
    a = t2i_prompt("a red fox in the snow", LAYOUT.target, LAYOUT.preview)
    b = t2i_prompt("cat", LAYOUT.target, LAYOUT.preview)
    return prompt_batch(model, [a, b, a, b], LAYOUT)


@pytest.fixture(scope="module")
def rollout(split, batch):
    ids, mask, pos, dec = batch
    return sample_ar(*split, ids, mask, pos, dec, jax.random.key(0), PARAMS, n_codes=CODES, eos_id=EOS_RL,
                     layout=LAYOUT)


@pytest.fixture(scope="module")
def scores(split, batch, rollout):
    ids, mask, pos, dec = batch
    return score_tokens_jit(*split, ids, mask, pos, dec, rollout.tokens, PARAMS, n_codes=CODES, eos_id=EOS_RL,
                            chunk=64)


def test_rollout_structure(rollout):
    tok, lp = np.asarray(rollout.tokens), np.asarray(rollout.logprobs)
    n = LAYOUT.n_tokens
    assert tok.shape == lp.shape == (4, n) and n == 13 * 19 + 2 * 3 + 1
    assert np.all((tok[:, :-1] >= 0) & (tok[:, :-1] < CODES))  # grid tokens are codes
    assert np.all(tok[:, -1] == EOS_RL) and np.all(lp[:, -1] == 0.0)
    assert np.all(np.isfinite(lp)) and np.all(lp <= 0.0)
    assert np.mean(tok[0] != tok[2]) > 0.5 and np.mean(tok[1] != tok[3]) > 0.5  # same prompt, other stream
    np.testing.assert_array_equal(np.asarray(rollout.preview).reshape(4, -1), tok[:, :LAYOUT.n_preview])
    np.testing.assert_array_equal(np.asarray(rollout.target).reshape(4, -1), tok[:, LAYOUT.n_preview:-1])
    assert rollout.target.shape == (4, 2, 3) and rollout.preview.shape == (4, 13, 19)


def test_sampler_logprobs_equal_rescoring(rollout, scores):
    assert np.all(np.asarray(scores.in_nucleus))
    err = np.abs(np.asarray(rollout.logprobs) - np.asarray(scores.logprobs)).max()
    assert err <= 1e-5, err
    lq = np.asarray(scores.temperature_logprobs)
    assert np.all(lq[:, :-1] <= np.asarray(scores.logprobs)[:, :-1] + 1e-6)  # truncation raises the kept probs
    assert np.all(lq[:, -1] == 0.0)


def test_teacher_forced_logprobs_equal_hf(hf, model, batch, rollout, scores):
    """transformers' forward over prompt + sampled tokens (decode M-RoPE positions), its warpers on the
    RL-masked fp32 logits, log-softmax, gathered at the sampled tokens."""
    ids, mask, pos, dec = batch
    tok = np.asarray(rollout.tokens)
    b, length = ids.shape
    n = tok.shape[1]
    f_ids = np.concatenate([ids, tok[:, :-1]], axis=1)
    f_mask = np.concatenate([mask, np.ones((b, n - 1), mask.dtype)], axis=1)
    f_pos = np.concatenate([pos, dec[:, :, :-1]], axis=2)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(f_ids), attention_mask=torch.tensor(f_mask),
                    position_ids=torch.tensor(f_pos, dtype=torch.long)).logits.float().numpy()
    rows = logits[:, length - 1:]  # [B, N, V] predicting tokens 0..N-1
    vocab = rows.shape[-1]
    valid = np.asarray(slot_valid_mask(vocab, CODES, EOS_RL, jnp.arange(n) == n - 1))
    ref_full = hf_processed(rows.reshape(-1, vocab), np.broadcast_to(valid, rows.shape).reshape(-1, vocab),
                            PARAMS).reshape(rows.shape)
    ref = np.take_along_axis(ref_full, tok[..., None], -1)[..., 0]
    assert np.abs(np.asarray(scores.logprobs) - ref).max() <= 1e-5
    assert np.abs(np.asarray(rollout.logprobs) - ref).max() <= 1e-5
    # the kept sets of our full-sequence logits equal transformers' at every position
    ours = np.asarray(model.forward(jnp.asarray(f_ids), jnp.asarray(f_pos), jnp.asarray(f_mask)))[:, length - 1:]
    got_full = np.asarray(processed_logprobs(jnp.asarray(ours), jnp.asarray(valid), PARAMS))
    np.testing.assert_array_equal(np.isfinite(got_full), np.isfinite(ref_full))
    assert np.isfinite(ref_full).sum(-1)[:, :-1].min() > 1 and np.all(np.isfinite(ref_full).sum(-1)[:, -1] == 1)


def test_score_tokens_gradient_is_chunk_invariant(split, batch, rollout, monkeypatch):
    """The same gradient from chunks of 37 positions with the remat's saved logits and kept-set bounds (the default,
    `SCORE_SAVED`) as from one chunk with nothing saved (the backward pass recomputes the logits and sorts again)."""
    from glm_jax.sampling import ar_sampler
    graphdef, state = split
    ids, mask, pos, dec = (jnp.asarray(x) for x in batch)
    weights = jnp.asarray(LAYOUT.loss_mask())

    def grad_fn(chunk):
        def loss(st):
            s = score_tokens(nnx.merge(graphdef, st), ids, mask, pos, dec, rollout.tokens, PARAMS, n_codes=CODES,
                             eos_id=EOS_RL, chunk=chunk)
            return jnp.sum(weights * (s.logprobs + 0.1 * s.temperature_logprobs))
        return jax.jit(jax.grad(loss))(state)

    # float32 matmuls (a GPU's default TF32 rounds recomputed logits otherwise, which can move kept sets)
    with jax.default_matmul_precision("highest"):
        g1 = jax.tree.leaves(grad_fn(37))
        monkeypatch.setattr(ar_sampler, "checkpoint_name", lambda x, name: x)     # nothing named: nothing saved
        g2 = jax.tree.leaves(grad_fn(1000))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in g1)
    assert max(float(jnp.abs(a).max()) for a in g1) > 0
    assert max(rel_err(a, c) for a, c in zip(g1, g2)) < 1e-5


def _sorts(jaxpr) -> int:
    """`sort` equations in a jaxpr, sub-jaxprs (scan bodies, remat) included."""
    return sum(eqn.primitive.name == "sort" for eqn in jaxpr_eqns(jaxpr))


def test_score_tokens_backward_does_not_sort_again(split, batch, rollout, monkeypatch):
    """The re-scoring's remat saves each chunk's logits and kept-set bounds (`SCORE_SAVED`): the gradient sorts the
    logits once, in the forward pass, and the backward pass rebuilds the kept set from the bounds; saving nothing,
    it sorts them again (the gradients of both are compared in `test_score_tokens_gradient_is_chunk_invariant`)."""
    from glm_jax.sampling import ar_sampler
    graphdef, state = split
    ids, mask, pos, dec = (jnp.asarray(x) for x in batch)

    def loss(st):
        s = score_tokens(nnx.merge(graphdef, st), ids, mask, pos, dec, rollout.tokens, PARAMS, n_codes=CODES,
                         eos_id=EOS_RL, chunk=64)
        return jnp.sum(jnp.where(jnp.isfinite(s.logprobs), s.logprobs, 0.0))

    forward = _sorts(jax.make_jaxpr(loss)(state).jaxpr)
    saved = _sorts(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    monkeypatch.setattr(ar_sampler, "checkpoint_name", lambda x, name: x)
    again = _sorts(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    assert forward == saved == 1 and again == 2, (forward, saved, again)


# ---------------------------------------------------------------------------------------------------------------
# draws follow exp(log pi)


def chi2_pvalue(samples: np.ndarray, lp: np.ndarray) -> float:
    """Pearson chi-square p-value of `samples` against exp(lp) over the support of lp (a draw outside it -> 0)."""
    support = np.isfinite(lp)
    counts = np.bincount(samples, minlength=lp.shape[0])
    if counts[~support].any():
        return 0.0
    expected = np.exp(lp[support].astype(np.float64)) * len(samples)
    return float(stats.chisquare(counts[support], expected * counts.sum() / expected.sum()).pvalue)


def test_draws_follow_processed_distribution(model, batch):
    ids, mask, pos, _ = batch
    logits = model.forward(jnp.asarray(ids[:1]), jnp.asarray(pos[:, :1]), jnp.asarray(mask[:1]))[0, -1]
    valid = slot_valid_mask(logits.shape[-1], CODES, EOS_RL)
    lp = processed_logprobs(logits, valid, PARAMS)  # the first step of the rollout: a nucleus of 56 codes
    lp_np = np.asarray(lp)
    kept = np.isfinite(lp_np)
    assert 10 < kept.sum() < CODES
    draws = jax.jit(jax.vmap(draw_token, (0, None)))
    keys = jax.random.split(jax.random.key(2024), 20000)
    assert chi2_pvalue(np.asarray(draws(keys, lp)), lp_np) > 1e-3
    # the same test rejects a sampler whose nucleus drops the boundary token (the smallest kept one)
    boundary = np.where(kept, lp_np, np.inf).argmin()
    assert np.exp(lp_np[boundary]) > 1e-3
    wrong = jax.nn.log_softmax(jnp.where(jnp.arange(lp.shape[0]) == boundary, -jnp.inf, lp))
    assert chi2_pvalue(np.asarray(draws(keys, wrong)), lp_np) < 1e-8


# ---------------------------------------------------------------------------------------------------------------
# i2i layout, keys, progress


def test_i2i_rollout_keys_and_progress(split, model):
    layout = ArLayout.i2i(96, 64)  # target 3x2
    codes = [list(np.random.default_rng(3).integers(0, N_CODES, 6))]
    ids, mask, pos, dec = prompt_batch(model, [i2i_prompt("blue", [(2, 3)], layout.target, codes=codes),
                                               i2i_prompt("make it a red car", [(2, 3)], layout.target,
                                                          codes=codes)], layout)
    assert mask[0, 0] == 0  # left-padded
    seen: list[tuple[int, int]] = []

    def progress(n, total):
        seen.append((int(n), int(total)))

    args = (*split, ids, mask, pos, dec)
    r1 = sample_ar(*args, jax.random.key(7), PARAMS, n_codes=CODES, eos_id=EOS_RL, layout=layout,
                   progress=progress, progress_every=2)
    jax.effects_barrier()
    assert seen == [(2, 7), (4, 7), (7, 7)]   # in order: the bar must not reach the end first
    assert r1.preview is None and r1.target.shape == (2, 3, 2)
    r2 = sample_ar(*args, jax.random.key(7), PARAMS, n_codes=CODES, eos_id=EOS_RL, layout=layout)
    np.testing.assert_array_equal(np.asarray(r1.tokens), np.asarray(r2.tokens))  # deterministic per key
    per_sample = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(2, dtype=jnp.uint32))
    r3 = sample_ar(*args, per_sample, PARAMS, n_codes=CODES, eos_id=EOS_RL, layout=layout)
    np.testing.assert_array_equal(np.asarray(r1.tokens), np.asarray(r3.tokens))
    r4 = sample_ar(*args, jax.random.key(7), PARAMS, n_codes=CODES, eos_id=EOS_RL, layout=layout,
                   sample_ids=jnp.array([5, 6]))
    assert np.any(np.asarray(r4.tokens) != np.asarray(r1.tokens))
    s = score_tokens_jit(*split, ids, mask, pos, dec, r1.tokens, PARAMS, n_codes=CODES, eos_id=EOS_RL)
    assert np.abs(np.asarray(s.logprobs) - np.asarray(r1.logprobs)).max() <= 1e-5
    with pytest.raises(ValueError, match="decode_positions"):
        sample_ar(*split, ids, mask, pos, dec[:, :, :-1], jax.random.key(0), n_codes=CODES, eos_id=EOS_RL,
                  layout=layout)
    with pytest.raises(ValueError, match="eos_id"):
        sample_ar(*args, jax.random.key(0), n_codes=CODES, eos_id=N_CODES + 1, layout=layout)
