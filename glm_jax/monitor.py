"""Watching training: TensorBoard scalars and image grids (tensorboardX), PNG grids in the workdir (`images/` for
the sampled groups, `eval/step_<N>.png` for evaluations), and a console progress bar with ETA plus a one-line
summary per logging step. Everything is a no-op outside process 0."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def _font(size: int):
    for p in _FONT_PATHS:
        if os.path.exists(p):
            return ImageFont.truetype(p, size)
    return ImageFont.load_default()


def image_grid(images: np.ndarray, *, columns: int, captions: Sequence[str] | None = None,
               min_cell: int = 128, pad: int = 2) -> np.ndarray:
    """Tiles uint8 images `[N, H, W, 3]` into rows of `columns` (one GRPO group per row), each with an optional
    caption (e.g. its rewards) printed under it. Small images are upscaled (nearest) to at least `min_cell`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    lines = max((len(c.split("\n")) for c in captions), default=0) if captions else 0
    fsize = max(9, min(14, cw // 14))
    text_h = lines * (fsize + 2)
    rows = math.ceil(n / columns)
    canvas = Image.new("RGB", (columns * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = _font(fsize)
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile = Image.fromarray(images[i]).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (x, y))
        if captions:
            draw.multiline_text((x + 2, y + ch + 1), captions[i], fill=(230, 230, 230), font=font, spacing=2)
    return np.asarray(canvas)


class Monitor:
    """TensorBoard + PNG + console output of a training run (only `is_main` writes anything)."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, is_main: bool = True,
                 stream=None):
        self.is_main = is_main
        self.workdir = workdir
        self.total = total_steps
        self.stream = sys.stderr if stream is None else stream
        self._t0, self._s0 = time.time(), start_step
        self._writer = None
        self._bar = None
        if is_main:
            from tensorboardX import SummaryWriter
            self.tb_dir = os.path.join(workdir, "tensorboard")
            self.image_dir = os.path.join(workdir, "images")
            os.makedirs(self.image_dir, exist_ok=True)
            self._writer = SummaryWriter(self.tb_dir, flush_secs=10)
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=self.stream,
                                 dynamic_ncols=True, disable=not getattr(self.stream, "isatty", lambda: False)())
            except ImportError:  # pragma: no cover
                self._bar = None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        for k, v in values.items():
            v = float(v)
            if math.isfinite(v):
                self._writer.add_scalar(k, v, step)

    def image(self, step: int, tag: str, grid_uint8: np.ndarray, *, save_png: bool = True) -> str | None:
        """Logs an HWC uint8 image to TensorBoard and (by default) saves it as `images/<tag>_<step>.png`."""
        if not self.is_main:
            return None
        self._writer.add_image(tag, grid_uint8, step, dataformats="HWC")
        if save_png:
            path = os.path.join(self.image_dir, f"{tag.replace('/', '_')}_{step:06d}.png")
            tmp = path + ".tmp"
            Image.fromarray(grid_uint8).save(tmp, format="PNG")
            os.replace(tmp, path)
            return path
        return None

    def eval_image(self, step: int, grid_uint8: np.ndarray) -> str | None:
        """Logs an evaluation grid to TensorBoard (`eval/grid`) and saves it as `eval/step_<step>.png`."""
        if not self.is_main:
            return None
        self._writer.add_image("eval/grid", grid_uint8, step, dataformats="HWC")
        directory = os.path.join(self.workdir, "eval")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"step_{step}.png")
        tmp = path + ".tmp"
        Image.fromarray(grid_uint8).save(tmp, format="PNG")
        os.replace(tmp, path)
        return path

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def summary(self, step: int, values: Mapping[str, float], keys: Sequence[str]) -> None:
        """One console line: step, ETA and the chosen metrics."""
        if not self.is_main:
            return
        done = step - self._s0
        rate = done / max(time.time() - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.total}", f"{rate * 60:.1f} steps/min", f"eta {_fmt_time(eta)}"]
        parts += [f"{k}={float(values[k]):.4g}" for k in keys if k in values]
        line = " | ".join(parts)
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
