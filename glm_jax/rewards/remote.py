"""`remote` reward: scores computed by a user's HTTP service (any language, any model), stdlib urllib only.

Protocol (one POST per batch to `url`, default `http://127.0.0.1:8000/`, `Content-Type: application/json`):

    request   {"prompts": [str] * B, "images": [base64 PNG] * B,
               "targets": [base64 PNG | null] * B,     only with send_targets=True
               "sources": [base64 PNG | null] * B}     only with send_sources=True
    response  200, {"scores": [number | null] * B, "metrics": {str: number}}   ("metrics" optional)

`null` scores mean "not applicable" (NaN). Connection errors, timeouts (`timeout_s` per request), HTTP 429 and 5xx
are retried up to `retries` times with exponential backoff (`backoff_s`, 2x per try); any other HTTP status or a
malformed body (not JSON, no "scores", wrong length, non-numbers) is an immediate error quoting the response.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000/"


class RemoteRewardError(RuntimeError):
    """The reward service could not be reached after all retries, or answered something unusable."""


def png_b64(image: np.ndarray) -> str:
    """Base64 (ASCII) of the PNG encoding of a uint8 `[H, W, 3]` image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_response(body: bytes, n: int, url: str) -> tuple[np.ndarray, dict[str, float]]:
    """Scores `[n]` (null -> NaN) and metrics from a response body; RemoteRewardError if malformed."""
    snippet = body[:200].decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except ValueError:
        raise RemoteRewardError(f"remote reward {url}: response is not JSON: {snippet!r}") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        raise RemoteRewardError(f"remote reward {url}: expected {{\"scores\": [{n} numbers]}}, got {snippet!r}")
    out = np.full(n, np.nan, np.float32)
    for i, s in enumerate(scores):
        if s is None:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RemoteRewardError(f"remote reward {url}: score {i} is {s!r}, expected a finite number or null")
        out[i] = s
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise RemoteRewardError(f"remote reward {url}: 'metrics' must map names to numbers, got {snippet!r}")
    return out, {str(k): float(v) for k, v in metrics.items()}


@register("remote")
class RemoteReward(Reward):
    """Posts the batch to a user's HTTP endpoint and returns its scores (protocol in the module docstring)."""

    def __init__(self, *, url: str = DEFAULT_URL, timeout_s: float = 60.0, retries: int = 2,
                 backoff_s: float = 0.5, send_targets: bool = False, send_sources: bool = False):
        parts = urllib.parse.urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RewardError(f"remote reward url must be http(s)://host:port/..., got {url!r}")
        if not timeout_s > 0 or int(retries) < 0:
            raise RewardError(f"remote reward needs timeout_s > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.send_targets = bool(send_targets)
        self.send_sources = bool(send_sources)

    def payload(self, images: np.ndarray, ctx: RewardContext) -> bytes:
        """The JSON request body."""
        body: dict[str, Any] = {"prompts": list(ctx.prompts), "images": [png_b64(x) for x in images]}
        for flag, key, seq in ((self.send_targets, "targets", ctx.targets), (self.send_sources, "sources", ctx.sources)):
            if flag:
                seq = seq or (None,) * len(ctx)
                body[key] = [None if x is None else png_b64(x) for x in seq]
        return json.dumps(body).encode("utf-8")

    def _post(self, data: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return resp.read()

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        data = self.payload(np.asarray(images), ctx)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                body = self._post(data)
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise RemoteRewardError(f"remote reward {self.url}: HTTP {e.code}: {detail!r}") from None
                last = f"HTTP {e.code}: {detail!r}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            else:
                scores, metrics = parse_response(body, len(ctx), self.url)
                return scores, {**metrics, "retries": float(attempt)}
            log.warning("remote reward %s: attempt %d/%d failed: %s", self.url, attempt + 1, self.retries + 1, last)
        raise RemoteRewardError(f"remote reward {self.url}: no answer after {self.retries + 1} attempts ({last})")
