"""`python -m glm_jax.train` on the embedded tiny model: T2I and I2I runs for each component mode, LoRA trains only
adapters (and exports as base + scale·A@B, also after `conversion.to_torch`), checkpoints resume exactly (EMA
included), SIGTERM leaves a restorable checkpoint, export reloads the trained params, and bad configs / data stop
with one line naming the field."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glm_jax import train
from glm_jax.config import ConfigError, apply_overrides, load_config, validate
from tests.util import CACHE_VARS

# tiny shapes; eval renders with the same ODE (steps, guidance) as the AR reward render so both share one compile
FAST = ["--config.train.steps=2", "--config.ar.decode_steps=2", "--config.dit.num_steps=4",
        "--config.ar.group_size=2", "--config.dit.group_size=2", "--config.log.images_every=2",
        "--config.log.eval_num_steps=2", "--config.log.eval_every=0"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(spec: str, args: list[str]):
    return validate(apply_overrides(load_config(spec), {a[len("--config."):].split("=")[0]: a.split("=", 1)[1]
                                                        for a in args}))


def _state(work, step: int) -> dict:
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(work, "checkpoints", str(step), "state")
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_params(module) -> dict[str, np.ndarray]:
    from flax import nnx
    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# (t2i, dit) is the `dit_run` fixture below and (i2i, both) the LoRA test: every mode and component runs the CLI
@pytest.mark.parametrize("mode,component", [("t2i", "ar"), ("t2i", "both"), ("i2i", "dit")])
def test_cli_runs_each_mode_and_component(mode, component, tmp_path, capsys):
    work = tmp_path / "run"
    assert train.main(["--config", f"configs/{mode}.py:tiny,{component}", "--workdir", str(work), *FAST]) == 0
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["component"] == component and cfg["mode"] == mode and cfg["train"]["steps"] == 2
    assert "2" in os.listdir(work / "checkpoints")
    assert any(f.startswith("events") for f in os.listdir(work / "tensorboard"))
    assert any(f.endswith("_000002.png") for f in os.listdir(work / "images"))
    assert os.listdir(work / "eval") == ["step_2.png"]          # evaluation at the end
    err = capsys.readouterr().err
    assert "step 2/2" in err and "checkpoints:" in err and "eval at step 2" in err
    assert "attention: XLA's attention in the DiT and the AR update (model.attention='')" in err    # CPU
    parts = ["ar", "dit"] if component == "both" else [component]
    tags = _tb_tags(work / "tensorboard")
    for part in parts:
        for tag in ("reward/total_mean", "reward/total_std", "adv/zero_std_ratio", "adv/mean", "loss",
                    "ratio_mean", "ratio_min", "ratio_max", "kl_loss", "logprob_mismatch_mean", "grad_norm",
                    "learning_rate", "tflops_per_s"):
            assert f"{part}/{tag}" in tags, f"{part}/{tag}"
        assert f"eval/{part}/reward/total_mean" in tags
    clip = {"ar": "ar/clip_frac", "dit": "dit/clipfrac"}
    assert all(clip[p] in tags for p in parts)
    assert {"time/decode_s", "throughput/images_per_s", "time/ar_sample_s"} <= tags
    if mode == "i2i":
        assert "time/source_encode_s" in tags
        if "dit" in parts:
            assert "dit/reward/structure/mean" in tags       # the structure reward saw the sources


def _tb_tags(directory) -> set[str]:
    """Scalar tags of the TensorBoard event files in `directory` (TFRecord frames of `Event` protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    tags = set()
    for path in glob.glob(os.path.join(directory, "events*")):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            tags.update(v.tag for v in ev.summary.value if v.HasField("simple_value"))
            i += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A 3-step T2I DiT run with EMA (decay 0.5 every 2 steps), a checkpoint every step."""
    work = tmp_path_factory.mktemp("dit") / "straight"
    args = [*FAST[1:], "--config.checkpoint.every=1", "--config.train.steps=3", "--config.ema.decay=0.5",
            "--config.ema.every=2"]
    assert train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(work), *args]) == 0
    return work, args


def test_resume_is_exact_with_ema(dit_run, tmp_path, capsys):
    straight, args = dit_run
    resumed = tmp_path / "resumed"
    assert train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(resumed), "--stop-after", "2",
                       *args]) == 0                                     # save and stop after step 2
    assert sorted(os.listdir(resumed / "checkpoints")) == ["1", "2"]
    capsys.readouterr()
    assert train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(resumed), *args]) == 0
    err = capsys.readouterr().err
    assert "resumed" in err and "the run is complete" not in err
    assert train.PHASE["now"] == "the evaluation at step 3"     # what an out-of-memory error would name
    a, b = _state(straight, 3), _state(resumed, 3)
    # a rerun of the finished run trains nothing more and says so
    assert train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(resumed), *args]) == 0
    assert "the run is complete (3 of train.steps=3)" in capsys.readouterr().err
    assert sorted(os.listdir(resumed / "checkpoints")) == ["1", "2", "3"]
    assert sorted(a) == sorted(b) and any("ema" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    p1, p2 = _state(straight, 1), _state(straight, 2)
    params = [k for k in a if "['params']" in k]
    assert any(not np.array_equal(p2[k], a[k]) for k in params)          # the update moved the params
    # EMA every 2 steps: unchanged after step 1, one update (0.5 * initial + 0.5 * params_2) after steps 2 and 3
    for k in params:
        e = k.replace("['dit']['params']", "['ema']['dit']")
        init = 2 * p2[e] - p2[k]
        np.testing.assert_allclose(p1[e], init, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[e], p2[e])


@pytest.mark.parametrize("variant,param_dtype", [("both", "float32"), ("both", "bfloat16"), ("both,lora", "float32")])
def test_trained_weights_take_model_param_dtype_whatever_the_checkpoint_stores(variant, param_dtype):
    """The released weights are stored in bf16; `model.param_dtype` (default float32) is what the trained weights
    are kept and updated in (LoRA: the adapters), while frozen weights keep their stored dtype and Adam's moments
    are float32 either way."""
    import jax
    import jax.numpy as jnp

    from glm_jax.pipeline import GlmImageStack, Split
    cfg = _cfg(f"configs/t2i.py:tiny,{variant}", [f"--config.model.param_dtype={param_dtype}"])
    stack = GlmImageStack.tiny()
    bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
    for name in ("ar", "dit"):
        part = getattr(stack, name)
        setattr(stack, name, Split(part.graphdef, jax.tree.map(bf16, part.state)))
    setup = train.build_train_state(cfg, stack, log=lambda m: None)

    def dtypes(tree):
        return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    lora = "lora" in variant
    for part in ("ar", "dit"):
        policy = getattr(setup.ts, part)
        assert dtypes(policy.params) == {param_dtype}, part
        assert dtypes(policy.opt_state) == {"float32"}, part
        assert dtypes(policy.frozen) == ({"bfloat16"} if lora or part == "ar" else set()), part
    if lora:
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(setup.ts.dit.params)]
        assert paths and all("lora" in p for p in paths)
    assert dtypes(setup.refs["dit"]) == {param_dtype}      # the KL reference (LoRA: the adapters switched off)


def test_dit_adv_clip_sets_the_dit_loss_clip():
    """`dit.adv_clip` is the DiT loss's own advantage clip (Flow-GRPO's), not `reward.adv_clip` (the clip of the
    computed advantages of both policies)."""
    from glm_jax.pipeline import GlmImageStack
    cfg = _cfg("configs/t2i.py:tiny,dit", ["--config.dit.adv_clip=2.5", "--config.reward.adv_clip=4.0"])
    setup = train.build_train_state(cfg, GlmImageStack.tiny(), log=lambda m: None)
    assert setup.specs["dit"].loss.adv_clip == 2.5


def test_resume_with_another_trained_state_is_one_line_and_names_the_change(dit_run, tmp_path, capsys):
    """A rerun whose config builds other arrays than the checkpoint (here: EMA off) stops before reading it, with
    one line naming the arrays and the changed field, and leaves the run's config.json as it was; a change that
    keeps the arrays (a learning rate) resumes and is logged."""
    straight, args = dit_run
    work = tmp_path / "w"
    shutil.copytree(straight, work)
    before = (work / "config.json").read_text()
    capsys.readouterr()
    rc = train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(work), *args, "--config.ema.decay=0.0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error:"), err
    assert "saved arrays this config does not train (e.g. ema.dit." in err and "ema.decay: 0.5 -> 0.0" in err, err
    assert (work / "config.json").read_text() == before
    assert train.main(["--config", "configs/t2i.py:tiny,dit", "--workdir", str(work), *args,
                       "--config.dit.lr=0.5"]) == 0
    err = capsys.readouterr().err
    assert "config changed since the checkpoint: dit.lr: 0.02 -> 0.5" in err and "the run is complete" in err
    assert json.loads((work / "config.json").read_text())["dit"]["lr"] == 0.5


def test_describe_mismatch_names_missing_extra_and_reshaped_arrays():
    from glm_jax.train_checkpoint import describe_mismatch
    saved = {"dit.params.a.lora_a": (32, 8), "dit.opt_state.mu.a.lora_a": (32, 8), "ema.dit.a": (4,), "step": ()}
    assert describe_mismatch(saved, dict(saved)) is None
    wanted = {"dit.params.a.lora_a": (32, 16), "dit.opt_state.mu.a.lora_a": (32, 16), "step": (), "ar.params.b": (2,)}
    msg = describe_mismatch(saved, wanted)
    assert "1 saved arrays this config does not train (e.g. ema.dit.a)" in msg
    assert "1 arrays of this config not in the checkpoint (e.g. ar.params.b)" in msg
    # parameters are named before optimizer moments
    assert "2 arrays of another shape (e.g. dit.params.a.lora_a: saved (32, 8), now (32, 16), dit.opt_state" in msg


def test_export_reloads_trained_params_and_ema(dit_run, tmp_path):
    from glm_jax import export
    from glm_jax.checkpoint import load_model
    work, _ = dit_run
    out = tmp_path / "ckpt"
    assert export.main(["--workdir", str(work), "--out", str(out)]) == 0
    step, trained = export.run_params(str(work))
    assert step == 3 and list(trained) == ["dit"]
    _, dit = load_model(str(out), "transformer")
    got = _flat_params(dit)
    assert sorted(got) == sorted(trained["dit"])
    for k, v in trained["dit"].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    base = export.base_checkpoint(export.read_run_config(str(work)))
    _, vae_out = load_model(str(out), "vae")
    _, vae_base = load_model(base, "vae")
    for k, v in _flat_params(vae_base).items():
        np.testing.assert_array_equal(_flat_params(vae_out)[k], v)
    assert export.main(["--workdir", str(work), "--out", str(out)]) == 2        # exists: needs --overwrite
    assert export.main(["--workdir", str(work), "--out", str(out), "--overwrite", "--ema", "--step", "2"]) == 0
    _, ema = export.run_params(str(work), 2, ema=True)
    _, dit_ema = load_model(str(out), "transformer")
    got = _flat_params(dit_ema)
    for k, v in ema["dit"].items():
        np.testing.assert_array_equal(got[k], v.astype(got[k].dtype), err_msg=k)
    assert json.loads((out / "glm_jax.json").read_text())["trained"]["ema"] is True
    assert not any(os.path.basename(p).startswith("ckpt.tmp") for p in glob.glob(str(tmp_path / "*")))


def test_i2i_both_lora_trains_only_adapters_and_exports_merged(tmp_path, capsys):
    """I2I with both components under LoRA: only adapters are trained and checkpointed; the export merges to
    base + alpha/rank * A @ B in `load_model` and in the PyTorch weights of `conversion.to_torch`."""
    from safetensors.numpy import load_file

    from conversion.table import find_jax
    from conversion.to_torch import export as to_torch
    from glm_jax import export
    from glm_jax.checkpoint import load_model, load_params
    from glm_jax.components import COMPONENTS
    work = tmp_path / "lora"
    args = [*FAST, "--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.dit.beta=0.01",
            "--config.ar.beta=0.01"]
    assert train.main(["--config", "configs/i2i.py:tiny,both,lora", "--workdir", str(work), *args]) == 0
    err = capsys.readouterr().err
    assert "eval at step 2" in err and "lora: " in err
    tags = _tb_tags(work / "tensorboard")
    assert {"ar/kl_loss", "dit/kl_loss", "time/source_encode_s", "dit/reward/structure/mean"} <= tags
    state = _state(work, 2)
    for part in ("ar", "dit"):
        params = [k for k in state if k.startswith(f"['{part}']['params']")]
        assert params and all(("['lora_a']" in k or "['lora_b']" in k) for k in params)
        assert any(np.abs(state[k]).max() > 0 for k in params if "lora_b" in k)     # B left zero: it trained
    out, hf = tmp_path / "ckpt", tmp_path / "hf"
    assert export.main(["--workdir", str(work), "--out", str(out)]) == 0
    base = export.base_checkpoint(export.read_run_config(str(work)))
    _, adapters = export.run_params(str(work))
    to_torch(str(out), str(hf))
    scale = 8.0 / 4
    for part, slot in export.SLOTS.items():
        base_flat = load_params(os.path.join(base, slot, "params"))
        _, merged = load_model(str(out), slot)
        merged = _flat_params(merged)
        ad = adapters[part]
        adapted = {k[: -len(".lora_a")] for k in ad if k.endswith(".lora_a")}
        assert adapted and len(ad) == 2 * len(adapted) and sorted(merged) == sorted(base_flat)
        for k, v in base_flat.items():
            d = k[: -len(".kernel")]
            want = v + scale * ad[d + ".lora_a"] @ ad[d + ".lora_b"] if d in adapted else v
            np.testing.assert_allclose(merged[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
        tensors = {}
        for f in glob.glob(str(hf / slot / "*.safetensors")):
            tensors.update(load_file(f))
        rules = COMPONENTS[slot].rules()
        for d in adapted:
            key, _ = find_jax(rules, d + ".kernel")
            np.testing.assert_allclose(tensors[key].T, merged[d + ".kernel"], rtol=1e-6, atol=1e-6, err_msg=key)


def test_sigterm_saves_a_restorable_checkpoint_and_rerun_resumes(tmp_path):
    """SIGTERM saves the current step and exits cleanly; a rerun resumes from it. Both processes use
    `train.compile_cache`: the first compiles and stores its steps, the rerun (another process) loads them."""
    from glm_jax.train_checkpoint import TrainCheckpointer
    work, cache = tmp_path / "run", tmp_path / "xla"

    def cmd(steps):
        return [sys.executable, "-m", "glm_jax.train", "--config", "configs/t2i.py:tiny,dit", "--workdir", str(work),
                *FAST[1:], f"--config.train.steps={steps}", "--config.checkpoint.every=1000",
                f"--config.train.compile_cache={cache}"]
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}     # only the run's own cache
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen(cmd(1000), cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    lines = []
    t0 = time.time()
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("step 2/1000"):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() - t0 < 240, "".join(lines[-20:])
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: saved step" in out
    saved = int(out.split("SIGTERM: saved step")[1].split(";")[0])
    assert saved >= 2
    ckpt = TrainCheckpointer(str(work / "checkpoints"), every=1000)
    assert ckpt.latest_step() == saved
    ckpt.close()
    state = _state(work, saved)
    assert int(state["['step']"]) == saved and any("['dit']['params']" in k for k in state)
    stats = re.findall(r"compilation cache: (\d+) programs loaded \(.* s of compiling saved\), (\d+) compiled and stored",
                       out)
    assert len(stats) == 1 and stats[0][0] == "0" and int(stats[0][1]) > 0, stats
    rerun = subprocess.run(cmd(saved + 1), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    err = rerun.stderr
    assert rerun.returncode == 0, err[-3000:]
    assert f"at step {saved}" in err and f"step {saved + 1}/{saved + 1}" in err
    # the rollout's programs come from the cache (the update's differ: its learning-rate schedule has new steps)
    stats = re.findall(r"compilation cache: (\d+) programs loaded", err)
    assert len(stats) == 1 and int(stats[0]) > 0, err[-3000:]
    assert len(os.listdir(cache)) > 0


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stepz=3", "train.stepz"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.image.height=100", "image.height"),
    ("--config.component=all", "component"),
    ("--config.ar.group_size=1", "ar.group_size"),
    ("--config.lora.rank=0", "lora.rank"),
    ("--config.lora.alpha=-1.0", "lora.alpha"),
    ("--config.lora.targets=attention,conv", "lora.targets"),
    ("--config.ema.decay=1.0", "ema.decay"),
    ("--config.ema.decay=-0.1", "ema.decay"),
    ("--config.ema.every=0", "ema.every"),
    ("--config.log.eval_num_steps=0", "log.eval_num_steps"),
    ("--config.dit.micro_steps=3", "dit.micro_steps"),
    ("--config.dit.adv_clip=0.0", "config.dit.adv_clip: must be > 0"),
    ("--config.reward.adv_clip=0.0", "config.reward.adv_clip: must be > 0"),
    ("--config.mesh.fsdp=2", "config.mesh.fsdp=2: multi-device training is not available"),
    ("--config.data.path=data/t2i", "config.data.path (i2i data): data/t2i/prompts.txt:1: no source image"),
    ("--config.reward.dit={'lpipz': 1.0}", "config.reward: dit.lpipz: unknown reward 'lpipz'"),
    ("--config.reward.dit={'structure': 1.0}", ("config.reward.dit: reward 'structure' compares each image with its "
     "source image, which t2i examples do not have")),
    ("--config.model.ckpt={tmp}/none", "config.model.ckpt: {tmp}/none: no such directory"),
    ("--config.model.ckpt={tmp}/torch", "config.model.ckpt: {tmp}/torch: a PyTorch"),
    ("--config.model.ckpt={tmp}/torch", "convert it once with `python -m conversion.from_torch --src {tmp}/torch"),
    ("--config.model.ckpt={tmp}/run", ("{tmp}/run: a training workdir, not a glm_jax checkpoint; export its trained "
     "weights first with `python -m glm_jax.export --workdir {tmp}/run")),
])
def test_bad_config_is_one_line(override, needle, tmp_path, capsys):
    """Each bad field is a one-line error naming it, raised before the run writes anything to its workdir."""
    spec = "configs/i2i.py:tiny" if "data.path" in override else "configs/t2i.py:tiny"
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "model_index.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    rc = train.main(["--config", spec, "--workdir", str(tmp_path / "w"), override.replace("{tmp}", str(tmp_path))])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "w").exists()


def test_out_of_memory_is_one_line_naming_the_phase_and_what_reduces_memory(tmp_path, capsys, monkeypatch):
    import jax

    def failing(message):
        def run(cfg, workdir, **kw):
            train.PHASE["now"] = "the DiT update of step 1"
            raise jax.errors.JaxRuntimeError(message)
        return run

    def main_with(message):
        monkeypatch.setattr(train, "train", failing(message))
        return train.main(["--config", "configs/t2i.py:tiny", "--workdir", str(tmp_path / "w")])

    assert main_with("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 47.20GiB with allocator GPU_0_bfc on "
                     "device 0. [tf-allocator-allocation-error=''] [executable_name='jit__lambda']") == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: out of device memory in the DiT update of step 1: "
                                              "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 47.20GiB"), err
    assert "--config.model.remat=dots" in err and "--config.mesh.fsdp=-1" in err and "tf-allocator" not in err
    assert "XLA_PYTHON_CLIENT_ALLOCATOR=vmm" in err          # the default pool: the VMM allocator is named

    assert main_with("RESOURCE_EXHAUSTED: Not enough PA budget: pa_allocated=90550829056B, allocation_size="
                     "49819942912B, pa_budget=112582410240B [executable_name='jit__lambda']") == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Not enough PA budget" in err and "XLA_CLIENT_MEM_FRACTION" in err, err
    assert "XLA_PYTHON_CLIENT_ALLOCATOR=vmm" not in err                     # already that allocator

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):     # not hidden behind a one-liner
        main_with("INTERNAL: something else")


def test_i2i_needs_one_source_count_per_run(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(ROOT, "data", "i2i"), data)
    shutil.move(data / "source_images" / "3.png", data / "source_images" / "3_0.png")
    shutil.copy(data / "source_images" / "3_0.png", data / "source_images" / "3_1.png")
    rc = train.main(["--config", "configs/i2i.py:tiny", "--workdir", str(tmp_path / "w"),
                     f"--config.data.path={data}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "prompts.txt:4" in err and "same number of sources" in err and "\n" not in err, err


def test_unknown_variant_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="variant"):
        load_config("configs/t2i.py:tiny,huge")
    cfg = validate(apply_overrides(load_config("configs/t2i.py:tiny"), {"data.path": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="none"):
        train.train(cfg, str(tmp_path / "w"), log=lambda *_: None)


def test_variants_compose():
    c = load_config("configs/i2i.py:lora,tiny,both")
    assert c.component == "both" and c.lora.enabled and c.model.ckpt == "" and c.dit.lr == 2e-2
    assert "structure" in c.reward.dit
    c = load_config("configs/t2i.py:dit,lora")
    assert c.lora.enabled and c.dit.lr == 3e-4 and c.ar.lr == 1e-5


def test_cudnn_parity_pad_makes_the_ar_update_sequence_even():
    """Under cuDNN attention the prompts get at most one extra (masked) pad token so that the AR update's
    teacher-forced sequence (prompt + generated - 2 tokens, `score_tokens`) is even, as cuDNN's masked
    backward pass requires; with any other attention nothing is added."""
    from glm_jax.sampling.ar_sampler import ArLayout
    from glm_jax.train import cudnn_parity_pad
    for mode, (h, w) in (("t2i", (64, 64)), ("t2i", (64, 96)), ("i2i", (96, 64))):
        n = (ArLayout.t2i(h, w) if mode == "t2i" else ArLayout.i2i(h, w)).n_tokens
        pads = [cudnn_parity_pad("cudnn", mode, length, h, w) for length in range(40, 46)]
        assert all((length + p + n - 2) % 2 == 0 for length, p in zip(range(40, 46), pads))
        assert set(pads) == {0, 1}
        assert all(cudnn_parity_pad(a, mode, length, h, w) == 0 for a in ("", "xla") for length in range(40, 46))
