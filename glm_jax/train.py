"""GRPO training of GLM-Image: `python -m glm_jax.train --config configs/{t2i,i2i}.py[:variants] --workdir DIR
[--config.a.b=value ...]`.

One iteration (per `component`):

    data batch (P prompts + targets [+ sources]) -> prompt ids [-> source codes, reference K/V] -> glyph conditions
    ar:   AR group rollout (P x G_ar token samples, rendered by the DiT ODE with x_T shared per group)
          -> AR reward set -> group advantages -> AR update
    dit:  one AR sample per prompt -> DiT group rollout (P x G_dit SDE trajectories) -> DiT reward set
          -> group advantages -> DiT update
    both: the two above in that order within one iteration, each policy with its own optimizer, learning rate and
          reward set; the DiT rollout reuses the first AR sample of each group as its prior tokens, and the AR's
          reward images are rendered by the DiT as it was at the start of the iteration.

**I2I** (`configs/i2i.py`): the sources go through the prompt builder (`PromptBuilder.build_i2i`); their VQ
codes (frozen vision tower) replace the `<|image|>` placeholders of the AR prompt, and their reference K/V (one
DiT "write" pass per source, computed once per prompt and step with the DiT of that step, shared by the group) is
read by every DiT call of the AR render, the DiT rollout and the DiT update. Static shapes: every example of a
run (train and eval) must have the same number of sources (checked at start-up), and sources are resized to the
target size `image.height x image.width` (bicubic) when they differ from it, so the source grids, the reference
K/V and the prompt lengths are the same in every step. The `structure` reward compares with the first source.

**LoRA** (`lora.enabled`): adapters (`glm_jax.lora.add_lora`) on the trained component(s); only they are
optimised and checkpointed, and the reference policy for `beta > 0` is the same module with every `lora_b`
zeroed (`adapters_off`), i.e. the base model, with no second copy of the base weights.

**EMA** (`ema.decay > 0`): a float32 EMA of the trained params (`glm_jax.ema`), updated every `ema.every` steps,
checkpointed with the state, used by evaluation and (on request) by `python -m glm_jax.export --ema`.

**Mesh** (`config.mesh`, `glm_jax.sharding`): the devices of every process, laid out as `data x fsdp x tensor`
(default `data=-1`: data parallelism over every device; e.g. `--config.mesh.data=1 --config.mesh.fsdp=-1` for
FSDP). With several devices every component is restored straight into its logical-axis sharding, the train state,
references and EMA are sharded, the updates are `sharding.ShardedUpdate`s (batches split over `data x fsdp`, so
`train.groups_per_step x <part>.group_size` must be a multiple of it; the AR sampler gathers the FSDP-split AR
weights once per rollout, `mesh.gather_decode`, the DiT's sampling loops the DiT's, `mesh.gather_dit`, and an
update its frozen weights (the LoRA base), `mesh.gather_frozen`), and the rollouts and evaluation run under
the mesh as one computation split over its batch axes; checkpoints restore into the current layout (also another
device count). Several processes (`python -m glm_jax.launch`, SLURM, `JAX_*` variables; `distributed.initialize`
runs first): each loads its own `groups_per_step / processes` prompts with their targets, every process builds
the conditioning of the whole global batch from its prompt texts, each scores its own prompts' images (outside the
mesh, on its own devices), the scores are gathered so every process computes the same advantages, a stop signal
on any process stops all after the same step, and only process 0 logs and writes images.

**Evaluation** every `log.eval_every` steps and at the end: the eval split's prompts are generated with the
current policy (EMA params when the EMA is on) by AR sampling and the DiT ODE (`log.eval_num_steps`,
`log.eval_guidance`) from a fixed seed, so successive evaluations are comparable; scored against the eval targets
with each trained component's reward set and logged under `eval/<part>/...`; the grid is saved as
`workdir/eval/step_<N>.png` (targets, I2I sources, then the generated images with their rewards) and sent to
TensorBoard.

The workdir holds `config.json` (the resolved config), `checkpoints/` (orbax, every `checkpoint.every` steps and
at the end, the last `checkpoint.keep` kept, asynchronous and atomic), `tensorboard/`, `images/` (PNG grids of
each sampled group with every image's reward) and `eval/`. A rerun with the same workdir resumes from the newest
complete checkpoint (trained params, optimizer states, EMA, step, RNG and data position); SIGTERM / SIGINT save
and exit. Logged per step: each reward component and the total (mean, std), advantages, clip fractions, ratio
mean/min/max, KL, rollout-vs-trainer log-prob error, zero-std group ratio, learning rates, grad / update norms,
the time split (AR sampling, DiT render / SDE, VAE decode, rewards, update), images/s and the updates' TFLOP/s
(model FLOPs: `dit_flops` per DiT forward, 3x for forward + backward; for the AR the 6·N·tokens estimate with N
its text decoder + head parameters, 2·N·tokens per reference forward).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

ERRORS = (ValueError, TypeError, FileNotFoundError)
PHASE = {"now": "starting"}     # what the run is doing, named by an out-of-memory error (`out_of_memory_message`)


def out_of_memory_message(e: BaseException, phase: str) -> str | None:
    """One line for an accelerator out-of-memory error (XLA's RESOURCE_EXHAUSTED) raised during `phase`, with the
    settings that reduce memory; None for any other error."""
    text = " ".join(str(e).split())
    if not isinstance(e, RuntimeError) or ("RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text):
        return None
    what = text.split(" [")[0].rstrip(".")      # without XLA's bracketed allocator / executable tags
    what = what if len(what) <= 320 else what[:320].rsplit(" ", 1)[0] + " ..."
    if "_bfc" in text:      # XLA's default pool: a large block needs one free piece of it
        allocator = (" or, when the GPU has the memory but not in one free piece, JAX's VMM allocator "
                     "(XLA_PYTHON_CLIENT_ALLOCATOR=vmm XLA_CLIENT_MEM_FRACTION=0.95);")
    elif "PA budget" in text:   # the VMM allocator: its budget is a fraction of the GPU's memory
        allocator = " or a larger budget for the VMM allocator (XLA_CLIENT_MEM_FRACTION, 0.75 by default);"
    else:
        allocator = ""
    return (f"out of device memory in {phase}: {what}. To fit: --config.model.remat=dots (keeps less for the "
            "backward pass), --config.train.micro_batch=N with N = the number of GPUs (and for the DiT "
            "--config.dit.micro_steps=1) for smaller update micro-batches, the lora variant, the parameters and "
            f"optimizer state split over more GPUs (--config.mesh.fsdp=-1);{allocator} docs/training.md lists what "
            "fits where")


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/<mode>.py[:variant,variant...]")
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and images go here; reruns resume")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="save a checkpoint and stop after this step (e.g. to fit a job time limit); rerun to resume")
    args, rest = ap.parse_known_args(argv)
    overrides = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            ap.error(f"unrecognised argument {item!r} (config overrides look like --config.train.steps=100)")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                ap.error(f"{item} needs a value")
            value, i = rest[i + 1], i + 1
        overrides[key] = value
        i += 1
    return args, overrides


def sync(tree) -> float:
    """Blocks until `tree` is computed (dispatch is asynchronous) so that a timer around its step is honest;
    returns 0.0 for use in sums."""
    import jax
    jax.block_until_ready(tree)
    return 0.0


def _captions(components: dict, total: np.ndarray) -> list[str]:
    out = []
    for i in range(len(total)):
        parts = [f"R={total[i]:.3f}"] + [f"{k[:10]}={v[i]:.3f}" for k, v in components.items()]
        out.append("\n".join(parts))
    return out


def glyph_length(prompt: str) -> int:
    """Glyph tokens T of one prompt: the ByT5 ids of all its quoted strings (`glm_jax.glyph` rules)."""
    from glm_jax.glyph import glyph_texts, glyph_token_ids
    return sum(len(ids) for ids in glyph_token_ids(glyph_texts(prompt)))


def pad_prompts(arp, length: int, pad_id: int):
    """Left-pads an `ArPrompts` batch to `length` tokens (padding is masked out, so results are unchanged;
    fixed shapes keep the rollout and update compiled once)."""
    extra = length - arp.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"prompt batch of {arp.input_ids.shape[1]} tokens is longer than the padded {length}")
    if extra == 0:
        return arp
    ids = np.pad(arp.input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(arp.attention_mask, ((0, 0), (extra, 0)), constant_values=0)
    pos = np.pad(arp.position_ids, ((0, 0), (0, 0), (extra, 0)), constant_values=1)
    return arp._replace(input_ids=ids, attention_mask=mask, position_ids=pos)


def cudnn_parity_pad(attention: str | None, mode: str, prompt_len: int, height: int, width: int) -> int:
    """Extra (masked) prompt padding so that the AR's teacher-forced update (`score_tokens`: the prompt plus
    `fed_back_tokens` generated ones) has an even length under cuDNN attention, whose masked backward pass rejects
    odd lengths: 0 or 1."""
    from glm_jax.sampling.ar_sampler import ArLayout, fed_back_tokens
    if attention != "cudnn":
        return 0
    layout = ArLayout.i2i(height, width) if mode == "i2i" else ArLayout.t2i(height, width)
    return (prompt_len + fed_back_tokens(layout.n_tokens)) % 2


def pad_glyph(glyph, length: int):
    """Left-pads glyph embeddings `[B, T, D]` with zero vectors to `length`, as the pipeline pads a batch to its
    longest prompt (the DiT attends to the zeros; a fixed length makes every batch look like one whose longest
    prompt has `length` glyph tokens)."""
    import jax.numpy as jnp
    extra = length - glyph.shape[1]
    return glyph if extra <= 0 else jnp.pad(glyph, ((0, 0), (extra, 0), (0, 0)))


def source_count(datasets, mode: str) -> int:
    """The number of sources per example shared by every example of `datasets` (0 for T2I); a one-line
    ValueError naming the first example whose count differs (I2I training needs one count per run)."""
    if mode != "i2i":
        return 0
    first = None
    for ds in datasets:
        if ds is None:
            continue
        for e in ds.examples:
            if first is None:
                first = e
            elif len(e.sources) != len(first.sources):
                raise ValueError(f"{e.where}: {len(e.sources)} source image(s), but {first.where} has "
                                 f"{len(first.sources)}; I2I training needs the same number of sources for every "
                                 f"example (train and eval)")
    return 0 if first is None else len(first.sources)


def prompt_length(builder, prompts: list[str], height: int, width: int, n_sources: int, chunk: int = 512) -> int:
    """The longest AR prompt (tokens) of `prompts` at `height x width` with `n_sources` target-sized sources: the
    padded length of every batch of the run."""
    from glm_jax.prompts import smart_resize, target_grids
    longest = 0
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        if n_sources == 0:
            longest = max(longest, int(builder.build_t2i(part, height, width).input_ids.shape[1]))
            continue
        c = builder.image_config
        sh, sw = smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
        src = (1, sh // c.patch_size, sw // c.patch_size)
        (th, tw), _ = target_grids(height, width)
        texts = [builder.render(p, n_sources) for p in part]
        grids = [[src] * n_sources + [(1, th, tw)] for _ in part]
        longest = max(longest, int(builder._finish(texts, grids, height, width, preview=None).input_ids.shape[1]))
    return longest


def resize_sources(sources, height: int, width: int) -> list[list[np.ndarray]]:
    """Each prompt's source images resized to `height x width` (bicubic) when their size differs (the I2I
    static-shape rule); images already of that size are passed through untouched."""
    from PIL import Image
    out = []
    for srcs in sources:
        row = []
        for s in srcs:
            if s.shape[:2] != (height, width):
                s = np.asarray(Image.fromarray(s).resize((width, height), Image.BICUBIC))
            row.append(s)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- state and steps


@dataclasses.dataclass
class TrainSetup:
    """The trained components' static halves and the mutable train state, in one place.

    `parts` are the trained components ("ar", "dit"); `specs[part]` the `ArSpec` / `DitSpec`; `lr_fns` the
    learning-rate schedules; `ts` the `TrainState` (trained params, frozen rest, optimizer states, step, RNG);
    `refs[part]` the reference params for `beta > 0` (a frozen copy, or `adapters_off` under LoRA); `ema[part]`
    the float32 EMA (absent when off); `lora[part]` the `LoraConfig` of LoRA runs; `forward_params[part]` the
    parameter count of the trained module's forward (FLOP estimates); `trained_params[part]` what is optimised;
    `mesh` the device mesh the state is laid out on (None: one device).
    """

    parts: tuple[str, ...]
    specs: dict
    lr_fns: dict
    ts: Any
    refs: dict
    ema: dict
    lora: dict
    forward_params: dict
    trained_params: dict
    mesh: Any = None


@functools.lru_cache(maxsize=16)
def _optimizer(opt_cfg):
    """One optax optimizer object per `OptimConfig` in a process: it is part of the static spec of the jitted
    updates, so a second run with the same settings (a test, a notebook) reuses their compiled code."""
    from glm_jax.grpo import optim as O
    return O.make_optimizer(opt_cfg)


def _count(tree) -> int:
    import jax
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def build_train_state(cfg, stack, *, log=print, mesh=None) -> TrainSetup:
    """Builds the policies of the trained components from `stack` (LoRA adapters added first when enabled), their
    optimizers, references, EMA and the initial `TrainState`. A trained component's module leaves `stack` (the
    state owns its buffers and the update steps donate them); use `current_split` to run it. With a `mesh` of
    several devices the state, references and EMA are laid out on it by the logical-axis rules
    (`glm_jax.sharding`); otherwise they are committed to the first device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from glm_jax.ema import ema_init
    from glm_jax.grpo import optim as O
    from glm_jax.grpo import train_step as T
    from glm_jax.sampling.ar_sampler import SamplingParams

    parts = tuple(p for p in ("ar", "dit") if cfg.component in (p, "both"))
    lora_cfg = None
    if cfg.lora.enabled:
        from glm_jax.lora import LoraConfig
        lora_cfg = LoraConfig.from_config(cfg.lora)
    sampling = SamplingParams(temperature=cfg.ar.temperature, top_k=cfg.ar.top_k or stack.n_codes,
                              top_p=cfg.ar.top_p)
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    specs, lr_fns, policies, refs, ema, loras, fwd, trained = {}, {}, {}, {}, {}, {}, {}, {}
    for k, part in enumerate(parts):
        opt_cfg = O.OptimConfig.from_config(cfg[part], cfg.train.steps)
        tx = _optimizer(opt_cfg)
        lr_fns[part] = O.lr_schedule(opt_cfg)
        module = getattr(stack, part).merge()
        base_filter = T.ar_trainable if part == "ar" else T.dit_trainable
        fwd[part] = _count(nnx.state(module, base_filter))
        trainable = base_filter
        if lora_cfg is None:
            # full fine-tuning: the trained weights in `model.param_dtype` whatever dtype the checkpoint stores
            # (the released weights are bf16, whose values near 0.01 lie 6.1e-5 apart: an update of lr 1e-5
            # would round away); the frozen rest keeps the stored dtype
            nnx.update(module, O.cast_floating(nnx.state(module, base_filter), param_dtype))
        else:
            from glm_jax.lora import add_lora, lora_trainable
            paths = add_lora(module, lora_cfg, rngs=nnx.Rngs(cfg.seed * 1000 + 17 + k), param_dtype=param_dtype)
            trainable = lora_trainable
            loras[part] = lora_cfg
            log(f"lora: {len(paths)} adapted {part} layers (rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, "
                f"targets {','.join(lora_cfg.targets)})")
        graphdef, policies[part] = T.init_policy(module, tx, trainable, copy=False)
        setattr(stack, part, None)            # the policy state now owns these buffers (donated by the updates)
        trained[part] = _count(policies[part].params)
        if part == "ar":
            specs[part] = T.ArSpec(graphdef, tx, T.ArLossConfig(
                n_codes=stack.n_codes, eos_id=stack.eos_id, sampling=sampling, eps_low=cfg.ar.epsilon,
                eps_high=cfg.ar.epsilon_high, loss_type=cfg.ar.loss_type, beta=cfg.ar.beta,
                micro_batch=cfg.train.micro_batch, gather_frozen=cfg.mesh.gather_frozen,
                gather_trained=cfg.mesh.gather_trained))
        else:
            specs[part] = T.DitSpec(graphdef, tx, T.DitLossConfig(
                clip_range=cfg.dit.clip_range, adv_clip=cfg.dit.adv_clip, beta=cfg.dit.beta,
                kernel=cfg.dit.kernel, guidance=cfg.dit.guidance, micro_batch=cfg.train.micro_batch,
                micro_steps=cfg.dit.micro_steps, gather_frozen=cfg.mesh.gather_frozen,
                gather_trained=cfg.mesh.gather_trained))
        if cfg[part].beta > 0:
            if lora_cfg is not None:
                from glm_jax.lora import adapters_off
                refs[part] = adapters_off(policies[part].params)
            else:
                refs[part] = jax.tree.map(jnp.copy, policies[part].params)
        if cfg.ema.decay > 0:
            ema[part] = ema_init(policies[part].params)
        log(f"{part}: {trained[part]:,} trained parameters in {cfg.model.param_dtype}"
            + (f" (LoRA on a {fwd[part]:,}-parameter model)" if lora_cfg is not None else ""))
    ts = T.init_train_state(jax.random.key(cfg.seed), ar=policies.get("ar"), dit=policies.get("dit"))
    if mesh is None or mesh.size == 1:
        # one device: committed to it, as a restored checkpoint is (same jit cache entries before and after a
        # resume)
        ts, refs, ema = jax.device_put((ts, refs, ema), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
        from glm_jax import sharding as S
        ts = S.shard_train_state(ts, mesh)
        refs = S.place(refs, S.tree_shardings(refs, mesh))
        ema = S.place(ema, S.tree_shardings(ema, mesh))
    return TrainSetup(parts, specs, lr_fns, ts, refs, ema, loras, fwd, trained, mesh)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted update steps of a `TrainSetup` (one place to attach shardings): `update[part](ts, batch)`
    returns `(ts, metrics of the last inner epoch)`; `ema(setup, step)` advances the EMA in place."""

    update: dict

    def ema(self, setup: TrainSetup, step: int, cfg) -> None:
        from glm_jax.ema import ema_maybe_update
        for part in setup.ema:
            setup.ema[part] = ema_maybe_update(setup.ema[part], getattr(setup.ts, part).params, step,
                                               decay=cfg.ema.decay, every=cfg.ema.every)


def make_steps(setup: TrainSetup, cfg) -> Steps:
    """The update functions of the trained components (`train_step.*_train_on_rollout`, jitted there with the
    state donated), bound to their specs, inner epochs and references. On a mesh of several devices they are
    `sharding.ShardedUpdate`s (explicit state / batch / reference shardings, the batch split over `data x fsdp`)."""
    from glm_jax.grpo import train_step as T

    def bind(part):
        if setup.mesh is not None and setup.mesh.size > 1:
            from glm_jax import sharding as S
            sharded = S.ShardedUpdate(part, setup.specs[part], setup.mesh, setup.ts)

            def sharded_update(ts, batch):
                ts, ms = sharded.train_on_rollout(ts, batch, cfg.train.num_iterations, setup.refs.get(part))
                return ts, ms[-1]
            return sharded_update
        fn = T.ar_train_on_rollout if part == "ar" else T.dit_train_on_rollout

        def update(ts, batch):
            ts, ms = fn(setup.specs[part], ts, batch, cfg.train.num_iterations, setup.refs.get(part))
            return ts, ms[-1]
        return update

    return Steps({part: bind(part) for part in setup.parts})


def current_split(setup: TrainSetup, stack, part: str, *, use_ema: bool = False):
    """`(graphdef, state)` of component `part` as it is now: the policy (EMA params with `use_ema` when the EMA is
    on) for a trained component, the loaded module otherwise."""
    from flax import nnx

    from glm_jax.ema import ema_as
    if part not in setup.parts:
        return getattr(stack, part)
    policy = getattr(setup.ts, part)
    params = policy.params
    if use_ema and part in setup.ema:
        params = ema_as(setup.ema[part], params)
    return setup.specs[part].graphdef, nnx.merge_state(params, policy.frozen)


def saved_state(setup: TrainSetup) -> dict:
    """The checkpointed pytree: step, RNG, each trained component's params and optimizer state, the EMA."""
    import jax
    ts = setup.ts
    out = {"step": ts.step, "rng": jax.random.key_data(ts.rng)}
    for part in setup.parts:
        p = getattr(ts, part)
        out[part] = {"params": p.params, "opt_state": p.opt_state}
    if setup.ema:
        out["ema"] = dict(setup.ema)
    return out


def restore_state(setup: TrainSetup, restored: dict) -> None:
    """Puts a restored `saved_state` tree back into `setup` (in place)."""
    import jax
    ts = setup.ts
    setup.ts = ts._replace(step=restored["step"], rng=jax.random.wrap_key_data(restored["rng"]),
                           **{k: getattr(ts, k)._replace(params=restored[k]["params"],
                                                         opt_state=restored[k]["opt_state"])
                              for k in setup.parts})
    if setup.ema:
        setup.ema = dict(restored["ema"])


# ------------------------------------------------------------------------------------------------- FLOPs


def dit_update_flops(dit_cfg, *, items: int, n_img: int, n_txt: int, n_ref: int, guidance: float, beta: float,
                     num_iterations: int) -> float:
    """Model FLOPs of the DiT updates on one rollout: `items` = samples x trained steps, each one forward (x2 with
    CFG) at 3x for forward + backward, one more forward with a reference (beta > 0), one more to compute the old
    log-probs when `num_iterations > 1`."""
    from glm_jax.models.dit import dit_flops
    fwd = dit_flops(dit_cfg, n_img, n_txt, n_ref) * (2 if guidance > 1 else 1) * items
    per_epoch = 3 * fwd + (fwd if beta > 0 else 0)
    return num_iterations * per_epoch + (fwd if num_iterations > 1 else 0)


def ar_update_flops(n_params: int, *, tokens: int, beta: float, num_iterations: int) -> float:
    """The 6·N·tokens estimate of the AR updates on one rollout (forward + backward; `tokens` = prompt + generated
    tokens of every sequence), 2·N·tokens more per reference forward (beta > 0) and for the old log-probs
    (`num_iterations > 1`)."""
    per_epoch = 6 * n_params * tokens + (2 * n_params * tokens if beta > 0 else 0)
    return num_iterations * per_epoch + (2 * n_params * tokens if num_iterations > 1 else 0)


# ------------------------------------------------------------------------------------------------- batches


@dataclasses.dataclass
class Prepared:
    """One global batch made ready for the rollouts: prompt texts, padded `ArPrompts` (I2I: source codes
    inserted), padded glyph conditions, the I2I reference K/V (batch P) and the first source of each prompt
    (rewards)."""

    prompts: list[str]
    arp: Any
    glyph: Any
    neg: Any
    ref_kv: Any = None
    first_sources: list | None = None


class BatchMaker:
    """Turns data batches into `Prepared` batches with the run's static shapes. The conditioning is made for
    the whole global batch (`Batch.global_prompts` / `global_sources`), the same on every process: the rollouts
    are one computation over the mesh, split over its batch axes."""

    def __init__(self, cfg, stack, setup: TrainSetup, *, max_len: int, max_glyph: int, n_sources: int, dtype,
                 image_token_id: int):
        self.cfg, self.stack, self.setup = cfg, stack, setup
        self.max_len, self.max_glyph, self.n_sources, self.dtype = max_len, max_glyph, n_sources, dtype
        self.image_token_id = int(image_token_id)

    def __call__(self, batch, *, negative: bool, times: dict | None = None, use_ema: bool = False) -> Prepared:
        from glm_jax.grpo import rollout as R
        from glm_jax.pipeline import ar_prompts_from_batch, glyph_conditions
        cfg, stack = self.cfg, self.stack
        H, W = cfg.image.height, cfg.image.width
        prompts = list(batch.global_prompts or batch.prompts)
        t0 = time.perf_counter()
        ref_kv = first = None
        if self.n_sources:
            sources = resize_sources(batch.global_sources or batch.sources, H, W)
            pb = stack.prompts.build_i2i(prompts, sources, H, W)
            ar = current_split(self.setup, stack, "ar", use_ema=use_ema)
            codes = R.source_codes(ar, pb.pixel_values, pb.source_grids_flat)
            arp = R.insert_source_codes(ar_prompts_from_batch(pb), codes, self.image_token_id)
            gh, gw = pb.source_grids[0][0]
            codes_P = codes.reshape(len(prompts), self.n_sources, gh, gw)
            vae_src = np.stack([np.stack(v) for v in pb.vae_sources])
            dit = current_split(self.setup, stack, "dit", use_ema=use_ema)
            ref_kv = R.source_reference_kv(dit, stack.vae, vae_src, codes_P)
            first = [s[0] for s in sources]
            if times is not None:
                times["time/source_encode_s"] = time.perf_counter() - t0 + sync(ref_kv)
        else:
            arp = ar_prompts_from_batch(stack.prompts.build_t2i(prompts, H, W))
        arp = pad_prompts(arp, self.max_len, stack.prompts.pad_id)
        glyph, neg = glyph_conditions(stack.t5, prompts, negative=negative, dtype=self.dtype)
        return Prepared(prompts, arp, pad_glyph(glyph, self.max_glyph), neg, ref_kv, first)


# ------------------------------------------------------------------------------------------------- eval


def evaluate(cfg, stack, setup: TrainSetup, make: BatchMaker, eval_ds, rewards, step: int, monitor, workdir: str,
             *, log=print) -> dict[str, float]:
    """Generates the eval prompts with the current policy (EMA params when on; AR sampling + DiT ODE from a
    fixed seed), scores them against the eval targets with each trained component's reward set, logs
    `eval/<part>/...` and saves the grid as `workdir/eval/step_<N>.png`. Returns the metrics. With several
    processes each generates and scores its own rows; the metrics and the grid are over all of them."""
    import jax
    import jax.numpy as jnp

    from glm_jax import data as D
    from glm_jax import distributed
    from glm_jax.grpo import rollout as R
    from glm_jax.monitor import image_grid
    from glm_jax.rewards import RewardContext
    from glm_jax.rewards.base import nan_mean_std

    H, W = cfg.image.height, cfg.image.width
    t0 = time.perf_counter()
    it = D.eval_iterator(eval_ds, cfg.train.groups_per_step, process_index=jax.process_index(),
                         process_count=jax.process_count(), global_sources=make.n_sources > 0)
    sched = stack.schedule(cfg.log.eval_num_steps, H, W)
    ar = current_split(setup, stack, "ar", use_ema=True)
    dit = current_split(setup, stack, "dit", use_ema=True)
    root = jax.random.fold_in(jax.random.key(cfg.seed), 0x6576616C)       # fixed: every eval draws the same noise
    images, prompts, targets, sources, valid = [], [], [], [], []
    for b, batch in enumerate(it):
        if cfg.log.eval_batches and b >= cfg.log.eval_batches:
            break
        with on_mesh(setup):
            prep = make(batch, negative=cfg.log.eval_guidance > 1, use_ema=True)
            p = len(prep.prompts)
            ids = jnp.arange(p, dtype=jnp.int32) + b * p
            tokens, _ = R.sample_group_tokens(ar, prep.arp, jax.random.fold_in(root, 0), ids,
                                              make_sampling(cfg, stack), n_codes=stack.n_codes, eos_id=stack.eos_id,
                                              gather=cfg.mesh.gather_decode)
            imgs = R.render_tokens(dit, stack.vae, tokens, prep.arp.layout, prep.glyph, prep.neg,
                                   jax.random.fold_in(root, 1), ids, sched, height=H, width=W,
                                   guidance=cfg.log.eval_guidance, ref_kv=prep.ref_kv, gather=cfg.mesh.gather_dit)
        images.append(distributed.own_rows(imgs, batch.rows))        # this process's rows (padding included)
        valid.append(np.asarray(batch.valid))
        prompts += list(batch.prompts)
        targets += list(batch.targets)
        if prep.first_sources is not None:
            sources += list(prep.first_sources[batch.rows])
    metrics: dict[str, float] = {}
    if not images:
        return metrics
    images_np, keep = np.concatenate(images), np.concatenate(valid)
    ctx = RewardContext.make(prompts, targets=targets, sources=sources or None)
    keep_all = distributed.gather_rows(keep)
    captions = [""] * len(keep_all)
    for part in setup.parts:
        res = rewards[part].on_devices(images_np, ctx, jax.local_devices())   # own rows; statistics over all
        total = distributed.gather_rows(res.total)
        components = {name: distributed.gather_rows(v) for name, v in res.components.items()}
        metrics[f"eval/{part}/reward/total_mean"], metrics[f"eval/{part}/reward/total_std"] = \
            nan_mean_std(total[keep_all])
        for name, v in components.items():
            metrics[f"eval/{part}/reward/{name}/mean"], metrics[f"eval/{part}/reward/{name}/std"] = \
                nan_mean_std(v[keep_all])
        for i, line in enumerate(_captions(components, total)):
            captions[i] += f"{part} {line}\n"
    metrics["time/eval_s"] = time.perf_counter() - t0
    monitor.scalars(step, metrics)
    # the grid shows every process's rows: targets (and first sources) at the images' size, gathered in row order
    hw = images_np.shape[1:3]
    tiles = [_fit(targets, hw)] + ([_fit(sources, hw)] if sources else []) + [images_np]
    tiles = [distributed.gather_rows(t)[keep_all] for t in tiles]
    captions = [c for c, k in zip(captions, keep_all, strict=True) if k]
    n = len(captions)
    if n == 0:
        return metrics
    labels = [f"target {i}" for i in range(n)] + ([f"source {i}" for i in range(n)] if sources else [])
    grid = image_grid(np.concatenate(tiles), columns=min(n, cfg.train.groups_per_step),
                      captions=labels + [c.strip() for c in captions])
    path = monitor.eval_image(step, grid)
    log(f"eval at step {step}: " + ", ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items()
                                              if k.endswith("total_mean")) + (f"; grid {path}" if path else ""))
    return metrics


def on_mesh(setup: TrainSetup):
    """A context in which the rollouts run over the setup's mesh (`jax.set_mesh`: the models' `constrain` calls
    apply and new arrays are global); a null context on one device. Rewards run outside it, on each process's
    own devices."""
    import jax
    if setup.mesh is None or setup.mesh.size == 1:
        return contextlib.nullcontext()
    return jax.set_mesh(setup.mesh)


def _fit(images: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """uint8 images of any sizes as one `[N, h, w, 3]` batch at `hw` (bicubic where the size differs)."""
    from PIL import Image
    h, w = int(hw[0]), int(hw[1])
    return np.stack([x if x.shape[:2] == (h, w) else np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC))
                     for x in images])


def make_sampling(cfg, stack):
    """The AR sampler's policy of the config (top_k 0 = every image code)."""
    from glm_jax.sampling.ar_sampler import SamplingParams
    return SamplingParams(temperature=cfg.ar.temperature, top_k=cfg.ar.top_k or stack.n_codes, top_p=cfg.ar.top_p)


# ------------------------------------------------------------------------------------------------- training


def _first_last(history: list[dict], key: str, n: int = 10) -> tuple[float, float] | None:
    vals = [h[key] for h in history if key in h and math.isfinite(h[key])]
    if len(vals) < 2:
        return None
    k = min(n, len(vals) // 2)
    return float(np.mean(vals[:k])), float(np.mean(vals[-k:]))


def make_train_mesh(cfg, log=print):
    """The device mesh of `config.mesh` over the devices of every process (`sharding.make_mesh`), logged with the
    devices it uses (when several). A mesh that does not fit the devices, a global batch that does not split over
    the processes, or update batches that do not split over the batch axes `data x fsdp` are one-line
    `ConfigError`s naming the field."""
    import jax

    from glm_jax import sharding as S
    from glm_jax.config import ConfigError
    n_proc = jax.process_count()
    if cfg.train.groups_per_step % n_proc:
        raise ConfigError(f"config.train.groups_per_step={cfg.train.groups_per_step}: each of the {n_proc} processes "
                          f"loads its share of the prompts; make it a multiple of {n_proc}")
    try:
        mesh = S.make_mesh(cfg.mesh)
    except ValueError as e:
        field, _, why = str(e).partition(": ")
        if jax.device_count() == 1 and "does not fit" in why:
            raise ConfigError(f"config.{field}: multi-device training is not available with the one visible device "
                              f"({jax.devices()[0]}): {why}") from None
        raise ConfigError(f"config.{e}") from None
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    n_batch = sizes["data"] * sizes["fsdp"]
    for part in ("ar", "dit"):
        if cfg.component not in (part, "both"):
            continue
        rows = cfg.train.groups_per_step * cfg[part].group_size
        if rows % n_batch:
            raise ConfigError(f"config.train.groups_per_step={cfg.train.groups_per_step} x config.{part}.group_size="
                              f"{cfg[part].group_size} = {rows} samples per {part} update do not split over the "
                              f"mesh's batch axes data x fsdp = {n_batch}; make them a multiple of {n_batch}")
    if mesh.size > 1:
        kinds = sorted({d.device_kind for d in mesh.devices.flat})
        log(f"mesh: {' x '.join(f'{a}={n}' for a, n in sizes.items())} over {mesh.size} devices "
            + (f"of {n_proc} processes " if n_proc > 1 else "")
            + f"({', '.join(kinds)}: {', '.join(str(d) for d in mesh.devices.flat)})")
        if cfg.mesh.gather_trained and sizes["fsdp"] > 1:
            log("mesh: the updates gather their trained weights once, before the micro-batches "
                "(mesh.gather_trained)")
    return mesh


class CompileCacheStats:
    """Counts what JAX's persistent compilation cache does between `start()` and `stop()`: programs loaded from
    it (and the compile time they saved) and programs compiled and stored in it."""

    def __init__(self):
        self.loaded = self.stored = 0
        self.saved_s = 0.0

    def _event(self, name, **_kw):
        if name == "/jax/compilation_cache/cache_hits":
            self.loaded += 1
        elif name == "/jax/compilation_cache/cache_misses":      # recorded when a compiled program is written
            self.stored += 1

    def _duration(self, name, secs, **_kw):
        if name == "/jax/compilation_cache/compile_time_saved_sec":
            self.saved_s += secs

    def start(self) -> CompileCacheStats:
        import jax
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        return self

    def stop(self) -> None:
        import jax
        jax.monitoring.unregister_event_listener(self._event)
        jax.monitoring.unregister_event_duration_listener(self._duration)

    def summary(self) -> str:
        return (f"compilation cache: {self.loaded} programs loaded ({self.saved_s:.1f} s of compiling saved), "
                f"{self.stored} compiled and stored")


def use_compile_cache(path: str, log=print) -> None:
    """Turns on JAX's persistent compilation cache in `path` (`train.compile_cache`): every step that took more
    than a second to compile is stored, and a rerun, a resume or another run with the same shapes loads it. Set
    once per process (JAX keeps the first directory it used)."""
    import jax
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    log(f"compilation cache: {path}")


def _quiet(*_args, **_kw) -> None:
    """The log of processes other than 0."""


def embedded_checkpoint(seed: int) -> str:
    """The embedded tiny checkpoint (`glm_jax.tiny.tiny_checkpoint`, written once to the cache). With several
    processes, process 0 writes it in a single-process subprocess (orbax saves are collective in a multi-process
    runtime) while the others wait at a barrier."""
    import jax

    from glm_jax import distributed
    from glm_jax.tiny import tiny_checkpoint
    if jax.process_count() == 1:
        return tiny_checkpoint(seed=seed)
    if jax.process_index() == 0:
        import subprocess
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                        "JAX_PROCESS_ID", "SLURM_"))}
        env["JAX_PLATFORMS"] = "cpu"
        code = f"from glm_jax.tiny import tiny_checkpoint; tiny_checkpoint(seed={int(seed)})"
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    distributed.sync("glm_jax.embedded_checkpoint")
    return tiny_checkpoint(seed=seed, backend="cpu")   # the copy the CPU subprocess wrote


def train(cfg, workdir: str, *, log=print, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the training of `cfg` in `workdir`; returns `{"step", "history"}` (per-step metrics of
    this process). `stop_after` saves and stops after that step (as an interruption would)."""
    import jax
    import jax.numpy as jnp

    from glm_jax import data as D
    from glm_jax import distributed
    from glm_jax.config import config_changes, save_config
    from glm_jax.grpo import rollout as R
    from glm_jax.grpo.advantages import compute_advantages
    from glm_jax.monitor import Monitor, image_grid
    from glm_jax.pipeline import GlmImageStack, resolve_attention
    from glm_jax.rewards import RewardContext, build_reward_sets
    from glm_jax.rewards.base import component_metrics, nan_mean_std
    from glm_jax.train_checkpoint import CheckpointMismatch, StopSignal, TrainCheckpointer

    PHASE["now"] = "starting"
    main_process = jax.process_index() == 0
    if not main_process:
        log = _quiet
    if cfg.train.compile_cache:
        use_compile_cache(cfg.train.compile_cache, log)
    mesh = make_train_mesh(cfg, log)
    H, W = cfg.image.height, cfg.image.width
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    use_ar, use_dit = cfg.component in ("ar", "both"), cfg.component in ("dit", "both")

    try:
        rewards = build_reward_sets({"ar": cfg.reward.ar.to_dict() if use_ar else {},
                                     "dit": cfg.reward.dit.to_dict() if use_dit else {},
                                     "options": cfg.reward.options.to_dict()})
    except ValueError as e:                 # name the config field (`config.reward: dit.lpipz: unknown ...`)
        raise ValueError(f"config.reward: {e}") from None
    if cfg.mode == "t2i":                   # before the model loads: a T2I example has no source to compare with
        for part, rs in rewards.items():
            for name, reward in rs.rewards.items():
                if reward.needs_source:
                    raise ValueError(f"config.reward.{part}: reward '{name}' compares each image with its source "
                                     "image, which t2i examples do not have (an i2i config has them)")
    try:
        train_ds, eval_ds = D.load_splits(cfg.data.path, cfg.mode, cfg.data.eval_path, log=log)
        n_sources = source_count([train_ds, eval_ds], cfg.mode)
    except ValueError as e:                 # the data of a config that does not fit it: name the field too
        field = "data.eval_path" if cfg.data.eval_path and cfg.data.eval_path in str(e) else "data.path"
        raise ValueError(f"config.{field} ({cfg.mode} data): {e}") from None
    it = D.train_iterator(train_ds, cfg.train.groups_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          global_sources=n_sources > 0)
    if cfg.model.ckpt:
        from glm_jax.checkpoint import read_manifest
        try:
            read_manifest(cfg.model.ckpt)
        except ValueError as e:
            raise ValueError(f"config.model.ckpt: {e}") from None
    ckpt_dir = cfg.model.ckpt or embedded_checkpoint(cfg.seed)
    # several devices: every parameter restored straight into its sharding (each process reads its shards)
    attention = resolve_attention(cfg.model.attention, dtype=dtype, backend=jax.default_backend(),
                                  tensor=dict(mesh.shape).get("tensor", 1))
    PHASE["now"] = "loading the model"
    stack = GlmImageStack.load(ckpt_dir, dtype=dtype, dit_remat=cfg.model.remat, ar_remat=cfg.model.remat,
                               attention=attention, mesh=mesh if mesh.size > 1 else None)
    stack.prompts.check_target_size(H, W)
    attention_name = "cuDNN flash attention" if attention == "cudnn" else "XLA's attention"
    log(f"attention: {attention_name} in the DiT and the AR update (model.attention={cfg.model.attention!r})")
    if n_sources:
        from glm_jax.prompts import source_agreement
        why = source_agreement(H, W, stack.prompts.image_config)
        if why is not None:
            raise ValueError(f"config.image: I2I sources are resized to the target size {W}x{H} (WxH), which the "
                             f"model cannot use as a source: {why}")
    # static shapes: every batch is padded to the longest prompt / glyph sequence of the data (train and eval)
    all_prompts = [e.prompt for ds in (train_ds, eval_ds) if ds is not None for e in ds.examples]
    max_len = prompt_length(stack.prompts, all_prompts, H, W, n_sources)
    max_len += cudnn_parity_pad(attention, cfg.mode, max_len, H, W)
    max_glyph = max(glyph_length(p) for p in all_prompts)
    no_eval = "; eval: none (no eval split: set data.eval_path)" if cfg.log.eval_every else ""
    log(f"data: {train_ds.summary()}" + (f"; eval: {len(eval_ds)} examples" if eval_ds is not None else no_eval)
        + f"; model: {cfg.model.ckpt or 'embedded tiny GLM-Image'}; mode: {cfg.mode}; component: {cfg.component}")
    dit_cfg = stack.dit.merge().cfg
    image_token_id = stack.ar.merge().cfg.image_token_id

    # the workdir is made once the data and the model have been read (a config that fails those checks leaves
    # none behind); the resolved config is written after a resume's checks
    os.makedirs(workdir, exist_ok=True)
    PHASE["now"] = "building the train state"
    setup = build_train_state(cfg, stack, log=log, mesh=mesh)
    steps = make_steps(setup, cfg)
    make = BatchMaker(cfg, stack, setup, max_len=max_len, max_glyph=max_glyph, n_sources=n_sources, dtype=dtype,
                      image_token_id=image_token_id)

    cfg_dict = cfg.to_dict()                # saved with each checkpoint (a resume compares it with its config)
    ckpt_meta = lambda: {"data": it.state(), "time": time.time(), "config": cfg_dict}
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
                             keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    if ckpt.latest_step() is not None:
        saved_cfg = ckpt.read_meta().get("config")
        if saved_cfg is None and os.path.exists(os.path.join(workdir, "config.json")):
            with open(os.path.join(workdir, "config.json")) as f:   # checkpoints written before the meta held it
                saved_cfg = json.load(f)
        changes = config_changes(saved_cfg, cfg_dict) if saved_cfg is not None else []
        try:
            step, restored, meta = ckpt.restore(saved_state(setup))
        except CheckpointMismatch as e:
            ckpt.close()
            raise ValueError(f"{e}; changed since that checkpoint: {', '.join(changes) or 'no config field'}. Rerun "
                             f"with the config it was saved with ({os.path.join(workdir, 'config.json')}) or use a new "
                             "--workdir") from None
        if changes:
            log("config changed since the checkpoint: " + ", ".join(changes))
        restore_state(setup, restored)
        it.restore(meta["data"])
        start = step
        log(f"resumed from {ckpt.directory} at step {step}")
        if step >= cfg.train.steps:
            log(f"the run is complete ({step} of train.steps={cfg.train.steps}); nothing to train (raise "
                "--config.train.steps to continue it)")

    if main_process:                        # after a resume's checks: a refused rerun leaves the run's config
        save_config(cfg, os.path.join(workdir, "config.json"))
    monitor = Monitor(workdir, total_steps=cfg.train.steps, start_step=start, is_main=jax.process_index() == 0)
    stop = StopSignal()
    render_sched = stack.schedule(cfg.ar.decode_steps, H, W)
    dit_sched = stack.schedule(cfg.dit.num_steps, H, W)
    sampling = make_sampling(cfg, stack)
    ar_rcfg = R.ArRolloutConfig(group_size=cfg.ar.group_size, sampling=sampling, decode_steps=cfg.ar.decode_steps,
                                decode_guidance=cfg.ar.decode_guidance, same_latent=True,
                                gather_weights=cfg.mesh.gather_decode, gather_dit=cfg.mesh.gather_dit)
    dit_rcfg = R.DitRolloutConfig(group_size=cfg.dit.group_size, num_steps=cfg.dit.num_steps,
                                  noise_level=cfg.dit.noise_level, kernel=cfg.dit.kernel,
                                  sde_window=cfg.dit.sde_window, timestep_fraction=cfg.dit.timestep_fraction,
                                  guidance=cfg.dit.guidance, gather_weights=cfg.mesh.gather_dit)
    guidance_needed = (use_ar and cfg.ar.decode_guidance > 1) or (use_dit and cfg.dit.guidance > 1)
    n_img = (H // 16) * (W // 16)
    history: list[dict] = []
    step = start

    def run_eval(step):
        if eval_ds is not None:
            PHASE["now"] = f"the evaluation at step {step}"
            m = evaluate(cfg, stack, setup, make, eval_ds, rewards, step, monitor, workdir, log=log)
            if history:
                history[-1].update(m)

    cache_stats = CompileCacheStats().start() if cfg.train.compile_cache else None
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t_iter = time.perf_counter()
            times: dict[str, float] = {}
            batch = next(it)
            with on_mesh(setup):
                prep = make(batch, negative=guidance_needed, times=times)
            prompts = prep.prompts                  # the global batch (this process's: batch.prompts)
            key = jax.random.fold_in(jax.random.key(cfg.seed), step)
            metrics: dict[str, float] = {}

            def score(part, roll_images, roll_group_ids, g, batch=batch, prep=prep, times=times,
                      metrics=metrics, step=step):
                """Rewards of one rollout (each prompt's target / first source repeated over its group) ->
                advantages; logs the reward / advantage metrics and, every `log.images_every` steps, the grid.
                Each process scores its own prompts' groups (`batch.rows`) on its own devices; the scores are
                gathered so that every process computes the same advantages of the whole batch."""
                t0 = time.perf_counter()
                own = slice(batch.rows.start * g, batch.rows.stop * g)
                images = distributed.own_rows(roll_images, own)
                srcs = (None if prep.first_sources is None
                        else [s for s in prep.first_sources[batch.rows] for _ in range(g)])
                ctx = RewardContext.make([p for p in batch.prompts for _ in range(g)],
                                         targets=[t for t in batch.targets for _ in range(g)], sources=srcs)
                res = rewards[part].on_devices(images, ctx, jax.local_devices())   # every local device
                components = {k: distributed.gather_rows(v) for k, v in res.components.items()}
                total = distributed.gather_rows(res.total)
                res.metrics.update(component_metrics(components))    # per-reward statistics over all processes
                group_ids = distributed.own_rows(roll_group_ids, slice(None))
                times[f"time/{part}_rewards_s"] = time.perf_counter() - t0
                adv = compute_advantages(components, group_ids, reward_weights=rewards[part].weights,
                                         scale_rewards=cfg.reward.scale_rewards, aggregation=cfg.reward.aggregate,
                                         clip=cfg.reward.adv_clip)
                a = np.asarray(adv.advantages, np.float64)
                metrics.update({f"{part}/adv/{k}": float(v) for k, v in adv.metrics.items()})
                metrics.update({f"{part}/adv/mean": float(a.mean()), f"{part}/adv/std": float(a.std()),
                                f"{part}/adv/abs_max": float(np.abs(a).max())})
                metrics.update({f"{part}/reward/{k}": v for k, v in res.metrics.items()})
                metrics[f"{part}/reward/total_mean"], metrics[f"{part}/reward/total_std"] = nan_mean_std(total)
                if cfg.log.images_every and step % cfg.log.images_every == 0:
                    monitor.image(step, f"train/{part}_groups",
                                  image_grid(images, columns=g, captions=_captions(res.components, res.total)))
                return adv

            def record(part, m, seconds, flops, metrics=metrics):
                metrics.update({f"{part}/{k}": float(v) for k, v in m.items()})
                metrics[f"{part}/update_tflop"] = flops / 1e12
                metrics[f"{part}/tflops_per_s"] = flops / 1e12 / max(seconds, 1e-9)

            tokens_for_dit = None
            if use_ar:
                g = cfg.ar.group_size
                PHASE["now"] = f"the AR rollout of step {step} (token sampling and the DiT render)"
                with on_mesh(setup):
                    roll = R.ar_group_rollout(current_split(setup, stack, "ar"), current_split(setup, stack, "dit"),
                                              stack.vae, prep.arp, prep.glyph, prep.neg, jax.random.fold_in(key, 0),
                                              ar_rcfg, render_sched, n_codes=stack.n_codes, eos_id=stack.eos_id,
                                              height=H, width=W, first_sample_id=step * 1_000_000,
                                              first_group_id=step * 10_000, ref_kv=prep.ref_kv, timings=times)
                adv = score("ar", roll.images, roll.group_ids, g)
                t0 = time.perf_counter()
                PHASE["now"] = f"the AR update of step {step}"
                setup.ts, m = steps.update["ar"](setup.ts, R.ar_batch(roll, adv.advantages, adv.weights))
                dt = time.perf_counter() - t0 + sync(m)
                times["time/ar_update_s"] = dt
                n_tok = roll.prompts.input_ids.shape[0] * (roll.prompts.input_ids.shape[1] + roll.tokens.shape[1])
                record("ar", m, dt, ar_update_flops(setup.forward_params["ar"], tokens=n_tok, beta=cfg.ar.beta,
                                                    num_iterations=cfg.train.num_iterations))
                tokens_for_dit = R.first_of_groups(roll.tokens, g)
            if use_dit:
                with on_mesh(setup):
                    if tokens_for_dit is None:
                        PHASE["now"] = f"the AR token sampling of step {step}"
                        t0 = time.perf_counter()
                        tokens_for_dit, _ = R.sample_group_tokens(
                            current_split(setup, stack, "ar"), prep.arp, jax.random.fold_in(key, 1),
                            np.arange(len(prompts)) + step * 1_000_000, sampling, n_codes=stack.n_codes,
                            eos_id=stack.eos_id, gather=cfg.mesh.gather_decode)
                        times["time/ar_sample_s"] = time.perf_counter() - t0 + sync(tokens_for_dit)
                    g = cfg.dit.group_size
                    PHASE["now"] = f"the DiT rollout of step {step}"
                    # the AR update donated the old state, so the DiT's current params are taken from the new one
                    droll = R.dit_group_rollout(current_split(setup, stack, "dit"), stack.vae, tokens_for_dit,
                                                prep.arp.layout, prep.glyph, prep.neg, jax.random.fold_in(key, 2),
                                                dit_rcfg, dit_sched, height=H, width=W,
                                                first_sample_id=step * 1_000_000, first_group_id=step * 10_000,
                                                ref_kv=prep.ref_kv, timings=times)
                adv = score("dit", droll.images, droll.group_ids, g)
                t0 = time.perf_counter()
                PHASE["now"] = f"the DiT update of step {step}"
                setup.ts, m = steps.update["dit"](setup.ts, R.dit_batch(droll, adv.advantages, adv.weights))
                dt = time.perf_counter() - t0 + sync(m)
                times["time/dit_update_s"] = dt
                n_ref = n_sources * n_img
                record("dit", m, dt, dit_update_flops(
                    dit_cfg, items=int(np.prod(droll.steps.shape)), n_img=n_img, n_txt=int(prep.glyph.shape[1]),
                    n_ref=n_ref, guidance=cfg.dit.guidance, beta=cfg.dit.beta,
                    num_iterations=cfg.train.num_iterations))
            steps.ema(setup, step, cfg)
            dt = time.perf_counter() - t_iter
            n_images = len(prompts) * ((cfg.ar.group_size if use_ar else 0) + (cfg.dit.group_size if use_dit else 0))
            metrics.update(times)
            metrics.update({f"{k}/learning_rate": float(fn(step - 1)) for k, fn in setup.lr_fns.items()})
            metrics["time/iteration_s"] = dt
            metrics["throughput/images_per_s"] = n_images / dt
            history.append(metrics)
            if len(history) == 1 and cache_stats is not None:     # every step's programs have compiled by now
                log(cache_stats.summary())
            if cfg.log.every and step % cfg.log.every == 0:
                monitor.scalars(step, metrics)
                monitor.summary(step, metrics, [k for k in ("ar/reward/total_mean", "dit/reward/total_mean",
                                                            "ar/loss", "dit/loss", "ar/kl_loss", "dit/kl_loss",
                                                            "throughput/images_per_s") if k in metrics])
            monitor.advance(step)
            last = step == cfg.train.steps
            stop_now = distributed.any_process(stop.requested)   # every process stops after the same step
            if ckpt.should_save(step) or last or stop_now:
                ckpt.save(step, saved_state(setup), ckpt_meta(), force=True)
            if stop_now:
                log(f"{stop.signal_name or 'a stop signal to another process'}: saved step {step}; exiting")
                break
            if stop_after is not None and step >= stop_after:
                ckpt.save(step, saved_state(setup), ckpt_meta(), force=True)
                break
            if (cfg.log.eval_every and step % cfg.log.eval_every == 0) or last:
                run_eval(step)
    finally:
        if cache_stats is not None:
            cache_stats.stop()
        ckpt.close()
        monitor.close()
        stop.restore_handlers()
    for part in ("ar", "dit"):
        fl = _first_last(history, f"{part}/reward/total_mean")
        if fl is not None:
            k = min(10, len(history) // 2)
            log(f"{part} reward (mean over a step's samples): first {k} steps {fl[0]:.4f} -> last {k} steps "
                f"{fl[1]:.4f} ({fl[1] - fl[0]:+.4f})")
    log(f"checkpoints: {ckpt.directory}\ntensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
        f"\nimage grids: {os.path.join(workdir, 'images')}"
        + (f"\neval grids: {os.path.join(workdir, 'eval')}" if eval_ds is not None else "")
        + f"\nexport: python -m glm_jax.export --workdir {workdir} --out <dir>")
    return {"step": step, "history": history}


def main(argv: list[str] | None = None) -> int:
    from glm_jax.config import ConfigError, apply_overrides, load_config, validate
    args, overrides = _parse(argv)
    from glm_jax import distributed
    distributed.initialize()                  # several processes (launcher / SLURM environment); else nothing
    try:
        cfg = validate(apply_overrides(load_config(args.config), overrides))
        train(cfg, args.workdir, log=lambda m: print(m, file=sys.stderr, flush=True), stop_after=args.stop_after)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        msg = out_of_memory_message(e, PHASE["now"])
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
