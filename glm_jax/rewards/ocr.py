"""OCR text-accuracy reward: does the image render the text the prompt quotes?

Target text: the prompt's quoted strings found by the glyph path's rule (`glm_jax.glyph.quoted_texts`: '...',
“...”, "...", 「...」, pattern by pattern), joined by one space. Recognised text: tesseract (through pytesseract)
on the whole image converted to 8-bit luminance (PIL "L"; reads cluttered colour scenes better than RGB input).
Both are normalised (Unicode NFKC; lower-cased unless `case_sensitive`; whitespace removed, collapsed or kept per
`whitespace`), then

    score = 1 - min(1, levenshtein(recognised, target) / len(target))        in [0, 1]

Rules:
* A prompt without quoted text (or whose target normalises to "") scores NaN = not applicable: it is not OCR'd,
  and the combination / advantage code skips it (`base.combine`). Metric `skipped` counts them.
* An OCR failure or timeout on one image (`timeout_s` per image) is logged as a warning with the sample index and
  scored `failure_score` (default 0.0); metrics `failures` / `timeouts` count them per batch.
* A missing tesseract binary or language pack is an error when the reward is built, not when it first runs.

Images are OCR'd concurrently in a thread pool (each call runs one tesseract process).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import shutil
import time
import unicodedata
from typing import Any

import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install tesseract-ocr` (or run `make`, which does it)"
WHITESPACE = ("remove", "collapse", "keep")


def prompt_text(prompt: str) -> list[str]:
    """The quoted strings of `prompt` by the glyph path's rule (empty when it quotes nothing)."""
    from glm_jax.glyph import quoted_texts  # the one definition of the quote rule

    return quoted_texts(prompt)


def normalise(text: str, case_sensitive: bool = False, whitespace: str = "remove") -> str:
    """NFKC, optional lower-casing, and whitespace 'remove' | 'collapse' (single spaces, stripped) | 'keep'."""
    text = unicodedata.normalize("NFKC", text)
    if not case_sensitive:
        text = text.lower()
    if whitespace == "remove":
        return "".join(text.split())
    if whitespace == "collapse":
        return " ".join(text.split())
    return text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit insert / delete / substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_score(recognised: str, target: str) -> float:
    """`1 - min(1, levenshtein / len(target))` of normalised strings; `target` must be non-empty."""
    return 1.0 - min(1.0, levenshtein(recognised, target) / len(target))


def check_tesseract(cmd: str = "tesseract", lang: str = "eng") -> None:
    """RewardError (one line, with the install command) unless tesseract and its `lang` data are available."""
    path = shutil.which(cmd)
    if path is None:
        raise RewardError(f"the 'text' reward needs the tesseract OCR binary ('{cmd}' not found): {INSTALL_HINT}")
    import pytesseract

    pytesseract.pytesseract.tesseract_cmd = path
    try:
        langs = set(pytesseract.get_languages(config=""))
    except Exception as e:  # noqa: BLE001 - any failure to run the binary is a setup error
        raise RewardError(f"tesseract at {path} does not run ({e}): {INSTALL_HINT}") from None
    missing = [x for x in lang.split("+") if x not in langs]
    if missing:
        raise RewardError(f"tesseract has no language data for {'+'.join(missing)} (has: {', '.join(sorted(langs))});"
                          f" install it with `apt-get install tesseract-ocr-{missing[0]}`")


@register("text")
class TextReward(Reward):
    """OCR accuracy of the prompt's quoted text (see the module docstring for the score and the NaN / failure rules).

    Options: `timeout_s` per image, `workers` (thread pool size, default min(8, cpu count)), `case_sensitive`,
    `whitespace` ('remove' | 'collapse' | 'keep'), `lang` (tesseract languages, e.g. 'eng' or 'eng+chi_sim'),
    `psm` (tesseract page segmentation mode; 3 = automatic layout, 11 = sparse text), `failure_score`,
    `tesseract_cmd`.
    """

    def __init__(self, *, timeout_s: float = 20.0, workers: int | None = None, case_sensitive: bool = False,
                 whitespace: str = "remove", lang: str = "eng", psm: int = 3, failure_score: float = 0.0,
                 tesseract_cmd: str = "tesseract"):
        if whitespace not in WHITESPACE:
            raise RewardError(f"unknown whitespace rule '{whitespace}' for reward 'text' (known: "
                              f"{', '.join(WHITESPACE)})")
        if not timeout_s > 0:
            raise RewardError(f"timeout_s of reward 'text' must be > 0, got {timeout_s}")
        check_tesseract(tesseract_cmd, lang)
        self.timeout_s = float(timeout_s)
        self.workers = int(workers or min(8, os.cpu_count() or 1))
        self.case_sensitive = bool(case_sensitive)
        self.whitespace = whitespace
        self.lang = lang
        self.config = f"--psm {int(psm)}"
        self.failure_score = float(failure_score)
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="ocr")

    def recognise(self, image: np.ndarray) -> str:
        """Tesseract's text for one uint8 `[H, W, 3]` image (raises on failure or timeout)."""
        import pytesseract
        from PIL import Image

        gray = Image.fromarray(image).convert("L")  # reads cluttered colour scenes better than tesseract's own
        return pytesseract.image_to_string(gray, lang=self.lang, config=self.config,
                                           timeout=self.timeout_s)

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        norm = lambda s: normalise(s, self.case_sensitive, self.whitespace)
        targets = [norm(" ".join(prompt_text(p))) for p in ctx.prompts]
        out = np.full(len(ctx), np.nan, np.float32)
        todo = [i for i, t in enumerate(targets) if t]
        host = np.asarray(images) if todo else None
        futures = {i: self._pool.submit(self.recognise, host[i]) for i in todo}
        # pytesseract kills tesseract after timeout_s; this deadline only guards against a hung worker.
        deadline = time.monotonic() + self.timeout_s * -(-len(todo) // self.workers) + 5.0
        failures = timeouts = 0
        for i, fut in futures.items():
            try:
                text = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                out[i] = text_score(norm(text), targets[i])
            except Exception as e:  # noqa: BLE001 - any OCR failure is scored by the documented rule
                is_timeout = isinstance(e, cf.TimeoutError) or "timeout" in str(e).lower()
                timeouts += is_timeout
                failures += 1
                log.warning("text reward: OCR %s on sample %d (prompt %r): %s; scored %.3g",
                            "timed out" if is_timeout else "failed", i, ctx.prompts[i][:60], e, self.failure_score)
                out[i] = self.failure_score
        metrics = {"failures": float(failures), "timeouts": float(timeouts),
                   "skipped": float(len(ctx) - len(todo))}
        return out, metrics
