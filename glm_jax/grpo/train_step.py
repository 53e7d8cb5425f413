"""GRPO update steps of the AR and the DiT as pure, jitted functions over a donated `TrainState`.

    ts = init_train_state(key, ar=ar_policy, dit=dit_policy)         # ar_policy = init_policy(module, tx)
    ts, metrics = ar_update_jit(ar_spec, ts, ar_batch)               # or dit_update_jit / both_update_jit
    ts, metrics = ar_train_on_rollout(ar_spec, ts, ar_batch, num_iterations=2)   # inner epochs

* **State.** `TrainState(step, rng, ar, dit)`; each trained component is a `PolicyState(params, frozen,
  opt_state)`: `params` the trained `nnx.Param`s (an `nnx.State`), `frozen` the rest of the module (the AR's
  source-image ViT/VQ), `opt_state` its optax state (float32, `optim.fp32_state`). The static half of a
  component (graphdef, optimizer, loss constants) is a hashable `ArSpec` / `DitSpec`, a static jit argument.
* **AR loss** (grpo_math §2): `score_tokens` (processed policy, chunked, teacher-forced at the decode positions)
  on the generated grid positions (`ArLayout.loss_mask`: preview + target, not the final EOS), ratio against
  `old_logprobs`, `ar_policy_loss` with eps_low / eps_high / loss_type / beta. With beta > 0 the frozen
  reference params are passed in (`ref_params`) and the KL is k3 on the masked-temperature distribution;
  with beta == 0 no reference is held or run.
* **DiT loss** (§3): every stored SDE transition `(n, j)` is an item; `step_logprob` replays it (same
  `velocity` / `transition_mean` / `gaussian_logprob` code as the sampler), `dit_policy_loss` with clip range,
  advantage clip and beta times Flow-GRPO's KL on the means against the reference DiT.
* **Gradient accumulation.** The batch (AR: sequences; DiT: sample-major (sample, step) items) is cut into
  `B / micro_batch` equal micro-batches (DiT: `B / micro_batch x J / micro_steps`) and a `lax.scan` sums their
  gradients. The loss normalisers are computed once over the whole batch (`ar_loss_normalizers` /
  `dit_loss_normalizers`) and passed to every micro-batch, so the update does not depend on the split (tested). Group size and groups per step are then free of memory.
* **Old log-probs and the ratio.** With `num_iterations == 1` and one update per rollout the ratio uses
  `old = stop_gradient(new)` from the same forward: exactly 1, the gradient is REINFORCE. Otherwise
  `*_old_logprobs` computes them before the first update with the trainer's own jitted micro-batch scan (the
  same loss function, forward only, same micro-batch shapes), so the first inner epoch starts at ratio 1 up to
  float rounding. The sampler's log-probs (`sampler_logprobs`) are only compared with the trainer's
  (`logprob_mismatch_*` metrics, grpo_math §2.5); for the DiT the sampler's stored lp may be passed as
  `old_logprobs` (Flow-GRPO's path), which agrees with the replay to ~1e-7 in float32 (tested at 1e-6).
* **Precision.** Parameters keep their dtype (bf16 or fp32); the module's compute dtype is set when it is built
  (`GlmImageStack.load(dtype=...)`); gradients are accumulated and the optimizer runs in float32; log-probs and
  all loss math are float32. The DiT's remat policy is the module's `remat` attribute (`dit_remat=` on load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm_jax.grpo.losses import (
    COUNTED_MEANS,
    ar_loss_normalizers,
    ar_policy_loss,
    dit_kl,
    dit_loss_normalizers,
    dit_policy_loss,
)
from glm_jax.sampling.ar_sampler import SamplingParams, score_tokens
from glm_jax.sampling.flow import FlowCond, step_logprob
from glm_jax.sampling.schedule import FlowSchedule
from glm_jax.sharding import gather_weights, shard_weights

Metrics = dict[str, jax.Array]
sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------------------- state


class PolicyState(NamedTuple):
    """One trained component: trained `params`, the untrained rest of the module (`frozen`), optimizer state."""

    params: Any
    frozen: Any
    opt_state: Any


class TrainState(NamedTuple):
    """The whole mutable training state (a pytree, donated to the update steps)."""

    step: jax.Array
    rng: jax.Array
    ar: PolicyState | None = None
    dit: PolicyState | None = None


def ar_trainable(path, value) -> bool:
    """The AR's trained parameters: everything but the source-image tokenizer (`visual`, `vqmodel`)."""
    return isinstance(value, nnx.Param) and str(path[0]) not in ("visual", "vqmodel")


def dit_trainable(path, value) -> bool:
    """Every DiT parameter is trained."""
    return isinstance(value, nnx.Param)


def init_policy(module: nnx.Module, tx: optax.GradientTransformation, trainable=nnx.Param, *, copy: bool = True
                ) -> tuple[Any, PolicyState]:
    """`(graphdef, PolicyState)` of a module: params selected by the `trainable` filter, the rest frozen.

    The state gets its own copies of the arrays: the update steps donate it, which must not delete buffers that
    the module (or a `GlmImageStack`) still uses. Pass `copy=False` when the module is not used afterwards.
    """
    graphdef, params, frozen = nnx.split(module, trainable, ...)
    if copy:
        params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    return graphdef, PolicyState(params, frozen, tx.init(params))


def init_train_state(rng: jax.Array, *, ar: PolicyState | None = None, dit: PolicyState | None = None
                     ) -> TrainState:
    """A fresh `TrainState` at step 0."""
    return TrainState(jnp.zeros((), jnp.int32), rng, ar, dit)


def policy_split(graphdef, policy: PolicyState):
    """`(graphdef, state)` of the current policy as one state (for the samplers, which merge a single state)."""
    return graphdef, nnx.merge_state(policy.params, policy.frozen)


def frozen_for_update(loss_cfg, frozen):
    """The untrained part of a policy as the micro-batch scan uses it. Under a mesh with `fsdp` and
    `loss_cfg.gather_frozen`, gathered once per update (`sharding.gather_weights`): for LoRA the frozen part is the
    whole base model, which XLA would otherwise gather per layer in every micro-batch's forward and backward
    (config `mesh.gather_frozen`; costs the frozen weights' full size per device during the update). The identity
    without a mesh."""
    return gather_weights(frozen) if loss_cfg.gather_frozen else frozen


def _merge(graphdef, params, frozen):
    return nnx.merge(graphdef, params, frozen)


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class ArLossConfig:
    """Static AR loss settings: PPO clip `eps_low` / `eps_high` (None = eps_low), `loss_type`, `is_level`,
    `beta` (k3 KL weight), `delta` (two-sided clip), the sampler's policy (`sampling`, `n_codes`, `eos_id`),
    the logits `chunk` of `score_tokens`, `micro_batch` sequences per accumulation step (0 = all),
    `gather_frozen` (see `frozen_for_update`) and `gather_trained` (see `_accumulate`)."""

    n_codes: int
    eos_id: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eps_low: float = 0.2
    eps_high: float | None = 0.28
    loss_type: str = "grpo"
    is_level: str = "token"
    beta: float = 0.0
    delta: float | None = None
    chunk: int = 128
    micro_batch: int = 0
    gather_frozen: bool = True
    gather_trained: bool = False


@dataclass(frozen=True)
class DitLossConfig:
    """Static DiT loss settings: `clip_range`, `adv_clip`, `beta` (Flow-GRPO KL weight), the SDE `kernel`,
    CFG `guidance` (as in the rollout), and the accumulation unit: `micro_batch` samples (0 = all) times
    `micro_steps` of each sample's J trained steps (0 = all J) per micro-batch. At 1024² one trained step of
    one sample is one DiT forward + backward, so `micro_steps=1` bounds the memory whatever the SDE window.
    `gather_frozen`: see `frozen_for_update`; `gather_trained`: see `_accumulate`."""

    clip_range: float = 1e-4
    adv_clip: float | None = 5.0
    beta: float = 0.0
    kernel: str = "sde"
    guidance: float = 1.0
    micro_batch: int = 0
    micro_steps: int = 0
    gather_frozen: bool = True
    gather_trained: bool = False


@dataclass(frozen=True)
class ArSpec:
    """Static half of the AR policy: module graphdef, optimizer, loss settings."""

    graphdef: Any
    tx: Any
    loss: ArLossConfig


@dataclass(frozen=True)
class DitSpec:
    """Static half of the DiT policy: module graphdef, optimizer, loss settings."""

    graphdef: Any
    tx: Any
    loss: DitLossConfig


# ------------------------------------------------------------------------------------------------ batches


class ArBatch(NamedTuple):
    """One AR update batch (B sequences). `position_ids [3, B, L]`, `decode_positions [3, B, N]`, `tokens`,
    `loss_mask` `[B, N]`, `advantages`, `weights` `[B]`; `old_logprobs [B, N]` or None (on-policy:
    ratio 1); `sampler_logprobs [B, N]` or None (only for the mismatch metric)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array
    decode_positions: jax.Array
    tokens: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    weights: jax.Array
    old_logprobs: jax.Array | None = None
    sampler_logprobs: jax.Array | None = None


class DitBatch(NamedTuple):
    """One DiT update batch: B samples x J stored SDE transitions. `x`, `x_next` `[B, J, h, w, c]` float32,
    `steps [B, J]` int32, `advantages`, `weights` `[B]`, `cond` a `FlowCond` of batch B, `sched` the
    `(timesteps, sigmas)` arrays, `noise_level` a scalar; `old_logprobs [B, J]` or None (on-policy);
    `sampler_logprobs [B, J]` or None (mismatch metric)."""

    x: jax.Array
    x_next: jax.Array
    steps: jax.Array
    advantages: jax.Array
    weights: jax.Array
    cond: FlowCond
    sched: tuple[jax.Array, jax.Array]
    noise_level: jax.Array
    old_logprobs: jax.Array | None = None
    sampler_logprobs: jax.Array | None = None


def _n_micro(batch: int, micro: int) -> int:
    if micro <= 0 or micro >= batch:
        return 1
    if batch % micro:
        raise ValueError(f"micro_batch {micro} does not divide the batch of {batch}")
    return batch // micro


def _to_micro(x, m: int, axis: int = 0):
    """`[..., B, ...]` (batch at `axis`) -> `[m, ..., B/m, ...]`: micro-batch i holds rows i, i + m, i + 2m, ...
    Strided rather than contiguous, so that a batch split over devices in contiguous blocks (the mesh's batch
    axes) gives every micro-batch the same share of rows on every device: no data moves and no device idles."""
    if x is None:
        return None
    x = jnp.asarray(x)
    b = x.shape[axis]
    x = x.reshape(x.shape[:axis] + (b // m, m) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def _from_micro(x):
    """`[m, B/m, ...]` (the strided micro-batches of `_to_micro`) -> `[B, ...]` in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


_SUMMED = ("policy_loss", "kl_loss", "tokens", "transitions")


def _reduce_metrics(stacked: Metrics) -> Metrics:
    """Per-micro-batch metrics `[m]` -> scalars: losses and counts summed (the losses carry global normalisers),
    per-token / per-transition means weighted by each micro-batch's count, `*_min` / `*_max` reduced by min / max,
    everything else averaged."""
    count = next((stacked[k] for k in ("tokens", "transitions") if k in stacked), None)
    out = {}
    for k, v in stacked.items():
        if k in _SUMMED:
            out[k] = jnp.sum(v)
        elif k in COUNTED_MEANS and count is not None:   # the whole batch's mean whatever the micro-batches hold
            out[k] = jnp.sum(v * count) / jnp.maximum(jnp.sum(count), 1.0)
        elif k.endswith("_min"):
            out[k] = jnp.min(v)
        elif k.endswith("_max"):
            out[k] = jnp.max(v)
        else:
            out[k] = jnp.mean(v)
    return out


def _accumulate(loss_fn, params, micro_xs, m: int, gather: bool = False):
    """Sum of `grad(loss_fn)(params, mb)` over the `m` micro-batches in `micro_xs` (a `lax.scan`, float32
    accumulators). Returns `(loss, grads, stacked metrics, stacked aux)`.

    `gather` (config `mesh.gather_trained`): under a mesh with `fsdp`, the trained params are gathered once
    before the scan and every micro-batch differentiates that gathered copy, instead of XLA gathering each
    layer's weights again in every micro-batch's forward and backward; the float32 accumulators keep the params'
    own (FSDP) sharding, so each micro-batch's gradient is reduce-scattered into them as before. Costs the
    trained weights' full size per device for the update. The identity without a mesh."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if gather:
        zeros = shard_weights(zeros)   # the params' own sharding, not the gathered copy's
        params = gather_weights(params)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, mb):
        g_acc, l_acc = acc
        (loss, (metrics, aux)), g = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        if gather:
            g_acc = shard_weights(g_acc)
        return (g_acc, l_acc + loss), (metrics, aux)

    (grads, loss), (metrics, aux) = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro_xs, length=m)
    return loss, grads, metrics, aux


def _apply(tx, policy: PolicyState, grads) -> tuple[PolicyState, Metrics]:
    updates, opt_state = tx.update(grads, policy.opt_state, policy.params)
    params = optax.apply_updates(policy.params, updates)
    return PolicyState(params, policy.frozen, opt_state), {"grad_norm": optax.tree.norm(grads),
                                                           "update_norm": optax.tree.norm(updates)}


# ------------------------------------------------------------------------------------------------------ AR


def _ar_micro_xs(batch: ArBatch, m: int, ref_params):
    mb = ArBatch(_to_micro(batch.input_ids, m), _to_micro(batch.attention_mask, m),
                 _to_micro(batch.position_ids, m, 1), _to_micro(batch.decode_positions, m, 1),
                 _to_micro(batch.tokens, m), _to_micro(batch.loss_mask, m), _to_micro(batch.advantages, m),
                 _to_micro(batch.weights, m), _to_micro(batch.old_logprobs, m), None)
    return mb


def _ar_scores(spec: ArSpec, model, mb: ArBatch):
    c = spec.loss
    return score_tokens(model, mb.input_ids, mb.attention_mask, mb.position_ids, mb.decode_positions, mb.tokens,
                        c.sampling, n_codes=c.n_codes, eos_id=c.eos_id, chunk=c.chunk)


def _ar_loss(spec: ArSpec, frozen, ref_params, norm, params, mb: ArBatch):
    """Loss of one AR micro-batch with the global normaliser `norm`; aux = (metrics, trainer log-probs)."""
    c = spec.loss
    scores = _ar_scores(spec, _merge(spec.graphdef, params, frozen), mb)
    lq_new = lq_ref = None
    if c.beta > 0:
        if ref_params is None:
            raise ValueError("beta > 0 needs the reference params (ref_params)")
        ref = _ar_scores(spec, _merge(spec.graphdef, ref_params, frozen), mb)
        lq_new, lq_ref = scores.temperature_logprobs, sg(ref.temperature_logprobs)
    loss, metrics = ar_policy_loss(scores.logprobs, mb.old_logprobs, mb.loss_mask, mb.advantages, mb.weights,
                                   eps_low=c.eps_low, eps_high=c.eps_high, loss_type=c.loss_type,
                                   is_level=c.is_level, beta=c.beta, lq_new=lq_new, lq_ref=lq_ref, norm=norm,
                                   delta=c.delta)
    return loss, (metrics, sg(scores.logprobs))


def _ar_norm(spec: ArSpec, batch: ArBatch):
    return ar_loss_normalizers(batch.loss_mask, batch.weights, spec.loss.loss_type)


def _mismatch(lp_trainer, lp_sampler, mask) -> Metrics:
    m = jnp.asarray(mask).astype(bool) & jnp.isfinite(lp_trainer) & jnp.isfinite(lp_sampler)
    d = jnp.where(m, jnp.abs(lp_trainer - jnp.where(m, lp_sampler, 0.0)), 0.0)
    return {"logprob_mismatch_mean": jnp.sum(d) / jnp.maximum(jnp.sum(m), 1), "logprob_mismatch_max": jnp.max(d)}


def ar_grads(spec: ArSpec, policy: PolicyState, batch: ArBatch, ref_params=None) -> tuple[Any, Metrics]:
    """Float32 gradients of the AR loss over the whole batch (micro-batch scan, global normalisers) and the
    metrics; the first half of `ar_update_step`."""
    b = batch.tokens.shape[0]
    m = _n_micro(b, spec.loss.micro_batch)
    norm = _ar_norm(spec, batch)
    loss_fn = partial(_ar_loss, spec, frozen_for_update(spec.loss, policy.frozen), ref_params, norm)
    loss, grads, stacked, lp = _accumulate(loss_fn, policy.params, _ar_micro_xs(batch, m, ref_params), m,
                                           spec.loss.gather_trained)
    metrics = {"loss": loss, **_reduce_metrics(stacked)}
    if batch.sampler_logprobs is not None:
        metrics.update(_mismatch(_from_micro(lp), batch.sampler_logprobs, batch.loss_mask))
    return grads, metrics


def ar_update_step(spec: ArSpec, ts: TrainState, batch: ArBatch, ref_params=None
                   ) -> tuple[TrainState, Metrics]:
    """One AR optimizer step on `batch` (pure). Returns the new state and scalar metrics (loss, ratios, clip
    fractions, KL, grad norm, learning-rate-free update norm, mismatch to the sampler's log-probs)."""
    grads, metrics = ar_grads(spec, ts.ar, batch, ref_params)
    new_policy, opt_metrics = _apply(spec.tx, ts.ar, grads)
    metrics.update(opt_metrics)
    ts = ts._replace(step=ts.step + 1, rng=jax.random.split(ts.rng)[0], ar=new_policy)
    return ts, metrics


def ar_old_logprobs(spec: ArSpec, ts: TrainState, batch: ArBatch) -> jax.Array:
    """Trainer log-probs `[B, N]` of the batch under the current params, by the update's own micro-batch scan
    (same loss function and shapes, forward only): the `old_logprobs` of later inner epochs."""
    policy = ts.ar
    b = batch.tokens.shape[0]
    m = _n_micro(b, spec.loss.micro_batch)
    norm = _ar_norm(spec, batch)
    spec_nokl = ArSpec(spec.graphdef, spec.tx, _replace(spec.loss, beta=0.0))
    fn = partial(_ar_loss, spec_nokl, frozen_for_update(spec.loss, policy.frozen), None, norm, policy.params)
    _, lp = jax.lax.map(lambda mb: fn(mb)[1], _ar_micro_xs(batch._replace(old_logprobs=None), m, None))
    return _from_micro(lp)


def _replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------------------------------- DiT


class _DitItems(NamedTuple):
    x: jax.Array
    x_next: jax.Array
    k: jax.Array
    adv: jax.Array
    w: jax.Array
    cond: FlowCond
    old: jax.Array | None


def _dit_items(batch: DitBatch) -> _DitItems:
    """Sample-major flattening of `[B, J]` transitions into `B*J` items, each with its own step index."""
    b, j = batch.steps.shape

    def rep(x):
        return None if x is None else jnp.repeat(jnp.asarray(x), j, axis=0)

    def flat(x):
        return None if x is None else jnp.asarray(x).reshape((b * j,) + jnp.shape(x)[2:])

    cond = FlowCond(glyph_BTD=rep(batch.cond.glyph_BTD), prior_ids_BN=rep(batch.cond.prior_ids_BN),
                    target_size_B2=rep(batch.cond.target_size_B2), crop_coords_B2=rep(batch.cond.crop_coords_B2),
                    neg_glyph_BTD=rep(batch.cond.neg_glyph_BTD),
                    ref_kv=jax.tree.map(rep, batch.cond.ref_kv) if batch.cond.ref_kv is not None else None)
    return _DitItems(flat(batch.x), flat(batch.x_next), flat(batch.steps).astype(jnp.int32),
                     rep(batch.advantages), rep(batch.weights), cond, flat(batch.old_logprobs))


def _dit_loss(spec: DitSpec, frozen, ref_params, sched, noise_level, norm, params, it: _DitItems):
    """Loss of one micro-batch of DiT items; aux = (metrics, replay log-probs)."""
    c = spec.loss
    dit = _merge(spec.graphdef, params, frozen)
    kw = {"guidance": c.guidance, "noise_level": noise_level, "kernel": c.kernel}
    out = step_logprob(dit, it.x, it.x_next, it.k, it.cond, sched, **kw)
    kl_terms, extra = None, {}
    if c.beta > 0:
        if ref_params is None:
            raise ValueError("beta > 0 needs the reference params (ref_params)")
        ref = step_logprob(_merge(spec.graphdef, ref_params, frozen), it.x, it.x_next, it.k, it.cond, sched, **kw)
        kl = dit_kl(out.mean, sg(ref.mean), sched, it.k, noise_level, c.kernel)
        kl_terms = kl.fg[:, None]
        extra = {"kl_exact": jnp.mean(sg(kl.exact))}
    old = None if it.old is None else it.old[:, None]
    loss, metrics = dit_policy_loss(out.logprob[:, None], old, it.adv, it.w, clip_range=c.clip_range,
                                    adv_clip=c.adv_clip, beta=c.beta, kl_terms=kl_terms, norm=norm)
    return loss, ({**metrics, **extra}, sg(out.logprob))


def _dit_n_micro(b: int, j: int, c: DitLossConfig) -> int:
    """Number of micro-batches of the `b * j` items: `micro_batch` samples x `micro_steps` steps each."""
    samples = c.micro_batch if 0 < c.micro_batch < b else b
    steps = c.micro_steps if 0 < c.micro_steps < j else j
    if b % samples or j % steps:
        raise ValueError(f"DiT micro-batch of {samples} samples x {steps} steps does not divide the batch of {b} "
                         f"samples x {j} trained steps (train.micro_batch, dit.micro_steps)")
    return (b // samples) * (j // steps)


def _dit_prepare(spec: DitSpec, batch: DitBatch):
    b, j = batch.steps.shape
    m = _dit_n_micro(b, j, spec.loss)
    items = _dit_items(batch)
    norm = dit_loss_normalizers(jnp.ones((b * j, 1), bool), items.w)
    micro = jax.tree.map(lambda x: _to_micro(x, m), items)
    sched = FlowSchedule(jnp.asarray(batch.sched[0]), jnp.asarray(batch.sched[1]), mu=0.0)
    return m, micro, norm, sched


def dit_grads(spec: DitSpec, policy: PolicyState, batch: DitBatch, ref_params=None) -> tuple[Any, Metrics]:
    """Float32 gradients of the DiT loss over the whole batch and the metrics; the first half of
    `dit_update_step`."""
    b, j = batch.steps.shape
    m, micro, norm, sched = _dit_prepare(spec, batch)
    loss_fn = partial(_dit_loss, spec, frozen_for_update(spec.loss, policy.frozen), ref_params, sched,
                      batch.noise_level, norm)
    loss, grads, stacked, lp = _accumulate(loss_fn, policy.params, micro, m, spec.loss.gather_trained)
    metrics = {"loss": loss, **_reduce_metrics(stacked)}
    if batch.sampler_logprobs is not None:
        metrics.update(_mismatch(_from_micro(lp).reshape(b, j), batch.sampler_logprobs, jnp.ones((b, j), bool)))
    return grads, metrics


def dit_update_step(spec: DitSpec, ts: TrainState, batch: DitBatch, ref_params=None
                    ) -> tuple[TrainState, Metrics]:
    """One DiT optimizer step on `batch` (pure): replay of every stored transition, Flow-GRPO loss, AdamW."""
    grads, metrics = dit_grads(spec, ts.dit, batch, ref_params)
    new_policy, opt_metrics = _apply(spec.tx, ts.dit, grads)
    metrics.update(opt_metrics)
    ts = ts._replace(step=ts.step + 1, rng=jax.random.split(ts.rng)[0], dit=new_policy)
    return ts, metrics


def dit_old_logprobs(spec: DitSpec, ts: TrainState, batch: DitBatch) -> jax.Array:
    """Replay log-probs `[B, J]` under the current params by the update's own micro-batch scan (forward only)."""
    policy = ts.dit
    b, j = batch.steps.shape
    spec_nokl = DitSpec(spec.graphdef, spec.tx, _replace(spec.loss, beta=0.0))
    _, micro, norm, sched = _dit_prepare(spec_nokl, batch._replace(old_logprobs=None))
    fn = partial(_dit_loss, spec_nokl, frozen_for_update(spec.loss, policy.frozen), None, sched, batch.noise_level,
                 norm, policy.params)
    _, lp = jax.lax.map(lambda it: fn(it)[1], micro)
    return _from_micro(lp).reshape(b, j)


# ---------------------------------------------------------------------------------------------------- both


def both_update_step(ar_spec: ArSpec, dit_spec: DitSpec, ts: TrainState, ar_batch: ArBatch, dit_batch: DitBatch,
                     ar_ref=None, dit_ref=None) -> tuple[TrainState, Metrics]:
    """One iteration for `component="both"`: the AR step on the AR batch (AR rewards, AR groups) and the DiT
    step on the DiT batch (DiT rewards, DiT groups), each with its own optimizer; one step count."""
    ts1, m_ar = ar_update_step(ar_spec, ts, ar_batch, ar_ref)
    ts2, m_dit = dit_update_step(dit_spec, ts1._replace(step=ts.step), dit_batch, dit_ref)
    metrics = {**{f"ar/{k}": v for k, v in m_ar.items()}, **{f"dit/{k}": v for k, v in m_dit.items()}}
    return ts2, metrics


# ------------------------------------------------------------------------------------------------ jitted

ar_update_jit = jax.jit(ar_update_step, static_argnums=0, donate_argnums=1)
dit_update_jit = jax.jit(dit_update_step, static_argnums=0, donate_argnums=1)
both_update_jit = jax.jit(both_update_step, static_argnums=(0, 1), donate_argnums=2)
ar_old_logprobs_jit = jax.jit(ar_old_logprobs, static_argnums=0)
ar_grads_jit = jax.jit(ar_grads, static_argnums=0)
dit_grads_jit = jax.jit(dit_grads, static_argnums=0)
dit_old_logprobs_jit = jax.jit(dit_old_logprobs, static_argnums=0)


def ar_train_on_rollout(spec: ArSpec, ts: TrainState, batch: ArBatch, num_iterations: int = 1, ref_params=None
                        ) -> tuple[TrainState, list[Metrics]]:
    """`num_iterations` inner epochs of AR updates on one rollout batch. One epoch: the on-policy path (ratio 1);
    more: the trainer's old log-probs first (`ar_old_logprobs`), then the clipped ratio in every epoch."""
    if num_iterations > 1:
        batch = batch._replace(old_logprobs=ar_old_logprobs_jit(spec, ts, batch))
    out = []
    for _ in range(num_iterations):
        ts, metrics = ar_update_jit(spec, ts, batch, ref_params)
        out.append(metrics)
    return ts, out


def dit_train_on_rollout(spec: DitSpec, ts: TrainState, batch: DitBatch, num_iterations: int = 1, ref_params=None
                         ) -> tuple[TrainState, list[Metrics]]:
    """`num_iterations` inner epochs of DiT updates on one rollout batch (see `ar_train_on_rollout`)."""
    if num_iterations > 1:
        batch = batch._replace(old_logprobs=dit_old_logprobs_jit(spec, ts, batch))
    out = []
    for _ in range(num_iterations):
        ts, metrics = dit_update_jit(spec, ts, batch, ref_params)
        out.append(metrics)
    return ts, out
