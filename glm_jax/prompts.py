"""GLM-Image prompt building on the host: what transformers' `GlmImageProcessor` and the diffusers pipeline do
before the AR model runs, without torch or transformers (the `tokenizers` library, jinja2, PIL and numpy).

A `PromptBuilder` is loaded from a checkpoint's `processor/` folder (`tokenizer.json`, `tokenizer_config.json`,
the chat template, the image-processor values) or from the tiny hub-free tokenizer of `glm_jax.tiny`. For a batch
of prompts (and, for image-to-image, source images) it returns a `PromptBatch` with:

* the rendered prompt `{prompt}<sop>{th} {tw}<eop>[<sop>{ph} {pw}<eop>]<bos>` (i2i: each source image first as
  `<bos><|image|>*(gh*gw)<eos>`), tokenized and left-padded with the tokenizer's pad id;
* `image_grids` per sample in `image_grid_thw` order (t2i: target then preview; i2i: sources then target), the
  grids in generation order, the prefill and decode M-RoPE position ids (`glm_jax.models.positions`) and the
  number of tokens to generate (all grid tokens + EOS);
* for i2i: the AR/VQ-path patch rows `pixel_values [N, C*p*p]` (HF `smart_resize` incl. its halving of the
  source size, PIL resize, rescale, normalise, raster patches in (C, p, p) order) and the per-source grids; the
  `<|image|>` placeholders are replaced by the VQ codes later (`GlmImageAR.insert_image_tokens`); and the
  VAE-path sources (PIL-Lanczos resize to multiples of 16, [-1, 1], channels-last) for the DiT reference pass.

Inputs the reference would accept but then crash on or silently mis-handle are refused with one-line errors:
target sides that are not multiples of 32 or lie outside the processor's pixel range, source images whose two
preprocessings disagree in size (the AR grid x2 must equal the VAE/DiT token grid), mixed t2i/i2i batches,
unequal source counts, and prompts containing the tokenizer's control tokens. Numpy sources must be uint8
`[H, W]`, `[H, W, 3]` or `[H, W, 4]` and are converted to PIL images first (the pipeline expects PIL images).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glm_jax.models import positions as P

AR_FACTOR = 32          # pixels per AR token of the target grid (`GlmImageProcessor._get_target_shape`)
VAE_MULTIPLE = 16       # VAE scale factor (8) x DiT patch size (2): pixels per DiT token
PREVIEW_SIDE = AR_FACTOR // 2

Grid = tuple[int, int]
GridTHW = tuple[int, int, int]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------------------------------------
# Configuration files


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The values of `GlmImageImageProcessor` that the AR/VQ-path preprocessing uses."""
    patch_size: int = 16
    merge_size: int = 1
    temporal_patch_size: int = 1
    min_pixels: int = 512 * 512
    max_pixels: int = 2048 * 2048
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict, source: str = "image processor config") -> ImageProcessorConfig:
        """Reads a `preprocessor_config.json` dict (or `processor_config.json["image_processor"]`). `min_pixels` /
        `max_pixels` win over `size.shortest_edge` / `size.longest_edge`, as in transformers."""
        size = d.get("size") or {}
        try:
            min_px = d.get("min_pixels", size.get("shortest_edge"))
            max_px = d.get("max_pixels", size.get("longest_edge"))
            if min_px is None or max_px is None:
                raise ValueError("needs min_pixels/max_pixels (or size.shortest_edge/longest_edge)")
            if "patch_size" not in d:
                raise ValueError("needs patch_size")
            cfg = cls(patch_size=int(d["patch_size"]), merge_size=int(d.get("merge_size", 1)),
                      temporal_patch_size=int(d.get("temporal_patch_size", 1)),
                      min_pixels=int(min_px), max_pixels=int(max_px),
                      image_mean=tuple(float(v) for v in d.get("image_mean", cls.image_mean)),
                      image_std=tuple(float(v) for v in d.get("image_std", cls.image_std)),
                      rescale_factor=float(d.get("rescale_factor", cls.rescale_factor)),
                      resample=int(d.get("resample", cls.resample)),
                      do_resize=bool(d.get("do_resize", True)), do_rescale=bool(d.get("do_rescale", True)),
                      do_normalize=bool(d.get("do_normalize", True)),
                      do_convert_rgb=bool(d.get("do_convert_rgb", True)))
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{source}: {_one_line(e)}") from None
        if cfg.merge_size != 1 or cfg.temporal_patch_size != 1:
            raise ValueError(f"{source}: GLM-Image uses merge_size 1 and temporal_patch_size 1, got "
                             f"{cfg.merge_size} and {cfg.temporal_patch_size}")
        if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
            raise ValueError(f"{source}: image_mean and image_std need 3 values")
        return cfg

    @property
    def shortest_edge(self) -> int:
        """The smallest side length `smart_resize` leaves unscaled (sqrt(min_pixels))."""
        return round(math.sqrt(self.min_pixels))

    @property
    def longest_edge(self) -> int:
        """The largest side length `smart_resize` leaves unscaled (sqrt(max_pixels))."""
        return round(math.sqrt(self.max_pixels))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The resized `(h, w)` of a source image on the AR/VQ path (transformers' GLM-Image `smart_resize`):
    scale so the short side reaches sqrt(min_pixels) and the long side stays below sqrt(max_pixels), then HALVE
    the size and round to multiples of `factor`."""
    if height < factor or width < factor:
        raise ValueError(f"height {height} or width {width} is smaller than {factor}")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.3g} is above 4")
    shortest, longest = round(math.sqrt(min_pixels)), round(math.sqrt(max_pixels))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    height, width = height // 2, width // 2
    h_bar = max(factor, round(height * scale / factor) * factor)
    w_bar = max(factor, round(width * scale / factor) * factor)
    if max(h_bar, w_bar) > longest:
        beta = max(h_bar, w_bar) / longest
        h_bar = max(factor, math.floor((h_bar / beta) / factor) * factor)
        w_bar = max(factor, math.floor((w_bar / beta) / factor) * factor)
    return h_bar, w_bar


def target_grids(height: int, width: int) -> tuple[Grid, Grid]:
    """The AR target grid `(H/32, W/32)` and the preview grid (`GlmImageProcessor._get_target_shape`)."""
    th, tw = height // AR_FACTOR, width // AR_FACTOR
    ratio = th / tw
    return (th, tw), (int(math.sqrt(ratio) * PREVIEW_SIDE), int(math.sqrt(1 / ratio) * PREVIEW_SIDE))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")  # noqa: TRY004
    return d


def _token_str(v) -> str | None:
    """A token from a tokenizer config entry: a string or a serialized `AddedToken` dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


# ----------------------------------------------------------------------------------------------------------------
# Images


def _to_pil_rgb(image, where: str, convert_rgb: bool = True):
    """A PIL image in RGB (transparency composited onto white, as transformers' `convert_to_rgb` does)."""
    import PIL.Image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"{where}: numpy images must be uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                             f"{image.dtype} {list(image.shape)}")
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if not convert_rgb:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def ar_pixel_values(image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, Grid]:
    """AR/VQ-path patch rows `[gh*gw, C*p*p]` (float32, raster, (C, p, p) per row) and the grid `(gh, gw)` of one
    RGB PIL image, exactly as the HF GLM-Image image processor (PIL backend) computes them."""
    import PIL.Image
    p = cfg.patch_size
    if cfg.do_resize:
        h_bar, w_bar = smart_resize(image.height, image.width, p * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
        image = image.resize((w_bar, h_bar), resample=PIL.Image.Resampling(cfg.resample))
    x = np.array(image)                                           # [H, W, C] uint8
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
        x = (x - np.asarray(cfg.image_mean, x.dtype)) / np.asarray(cfg.image_std, x.dtype)
    x = np.asarray(x, np.float32)
    h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    rows = x.reshape(gh, p, gw, p, c).transpose(0, 2, 4, 1, 3).reshape(gh * gw, c * p * p)
    return rows, (gh, gw)


def vae_source(image) -> np.ndarray:
    """VAE-path source `[h, w, 3]` in [-1, 1] (float32, channels-last) of one RGB PIL image: Lanczos resize to
    `(H//16*16, W//16*16)` as the pipeline's `VaeImageProcessor.preprocess` does."""
    import PIL.Image
    h, w = image.height // VAE_MULTIPLE * VAE_MULTIPLE, image.width // VAE_MULTIPLE * VAE_MULTIPLE
    image = image.resize((w, h), resample=PIL.Image.Resampling.LANCZOS)
    x = np.array(image).astype(np.float32) / 255.0
    return 2.0 * x - 1.0


def source_agreement(height: int, width: int, cfg: ImageProcessorConfig) -> str | None:
    """None when a `height x width` source gives the same token grid on the AR path (x2) and on the VAE/DiT
    path; otherwise the reason, in words."""
    try:
        h_bar, w_bar = smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels,
                                    cfg.max_pixels)
    except ValueError as e:
        return f"the AR image processor refuses it ({_one_line(e)})"
    gh, gw = h_bar // cfg.patch_size, w_bar // cfg.patch_size
    vh, vw = height // VAE_MULTIPLE, width // VAE_MULTIPLE
    if (2 * gh, 2 * gw) != (vh, vw):
        return (f"the AR path gives a {gh}x{gw} grid ({2 * gh}x{2 * gw} at DiT resolution) but the VAE path "
                f"gives {vh}x{vw}")
    return None


def _suggest_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int] | None:
    """A nearby `(h, w)` (multiples of 32, inside the processor range) that satisfies the size-agreement rule."""
    lo, hi = cfg.shortest_edge, cfg.longest_edge
    s = max(1.0, lo / min(height, width))
    s = min(s, hi / max(height, width))
    lo32, hi32 = -(-lo // AR_FACTOR) * AR_FACTOR, hi // AR_FACTOR * AR_FACTOR
    if lo32 > hi32:
        return None
    h, w = (min(max(round(v * s / AR_FACTOR) * AR_FACTOR, lo32), hi32) for v in (height, width))
    return (h, w) if source_agreement(h, w, cfg) is None else None


# ----------------------------------------------------------------------------------------------------------------
# Batch


@dataclass(frozen=True)
class PromptBatch:
    """A tokenized, left-padded prompt batch with everything the AR rollout and the DiT need from the prompt.

    `input_ids`/`attention_mask` `[B, L]` int32; `image_grids[b]` lists `(1, h, w)` rows in `image_grid_thw`
    order; `gen_grids[b]` the grids in generation order; `position_ids [3, B, L]` and `decode_position_ids
    [3, B, N]` (slot n = position of the n-th generated token); `decode_start [B]`; `num_new_tokens = N`;
    `target_offset` = index of the first target-grid token among the generated ones (t2i: after the preview).
    i2i only: `pixel_values [sum gh*gw, C*p*p]` float32 (sample-major, sources in order), `source_grids[b]` the
    `(gh, gw)` of sample b's sources, `vae_sources[b]` their VAE-path arrays `[h, w, 3]` in [-1, 1]."""
    texts: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_grids: list[list[GridTHW]]
    gen_grids: list[list[Grid]]
    position_ids: np.ndarray
    decode_start: np.ndarray
    decode_position_ids: np.ndarray
    num_new_tokens: int
    height: int
    width: int
    target_grid: Grid
    preview_grid: Grid | None
    target_offset: int
    pixel_values: np.ndarray | None = None
    source_grids: list[list[Grid]] | None = None
    vae_sources: list[list[np.ndarray]] | None = None

    @property
    def is_i2i(self) -> bool:
        """True for an image-to-image batch (it carries source images)."""
        return self.source_grids is not None

    @property
    def image_grid_thw(self) -> np.ndarray:
        """All samples' grids concatenated `[sum_b n_b, 3]`, as transformers' `image_grid_thw`."""
        return np.array([g for gs in self.image_grids for g in gs], np.int64).reshape(-1, 3)

    @property
    def images_per_sample(self) -> np.ndarray:
        """Grids per sample `[B]` (sources + 2 for t2i, sources + 1 for i2i), as transformers returns it."""
        return np.array([len(gs) for gs in self.image_grids], np.int64)

    @property
    def source_grids_flat(self) -> tuple[Grid, ...]:
        """All source grids in `pixel_values` order (the `grids` of `GlmImageAR.insert_image_tokens`)."""
        return tuple(g for gs in (self.source_grids or []) for g in gs)


@dataclass(frozen=True)
class _TokenIds:
    image_start_token_id: int
    image_end_token_id: int


class PromptBuilder:
    """Builds GLM-Image AR prompt batches (t2i and i2i) like `GlmImageProcessor` + the diffusers pipeline."""

    def __init__(self, tokenizer, tokenizer_config: dict, chat_template: str, image_config: ImageProcessorConfig,
                 source: str = "tokenizer_config.json"):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.chat_template = chat_template
        extra = tokenizer_config.get("extra_special_tokens")
        extra = extra if isinstance(extra, dict) else {}
        names = ("bos_token", "eos_token", "pad_token", "image_token", "grid_bos_token", "grid_eos_token")
        tokens = {}
        for name in names:
            tok = _token_str(tokenizer_config.get(name)) or _token_str(extra.get(name))
            if tok is None:
                raise ValueError(f"{source}: missing {name}")
            if tokenizer.token_to_id(tok) is None:
                raise ValueError(f"{source}: {name} {tok!r} is not a token of tokenizer.json")
            tokens[name] = tok
        self.tokens = tokens
        self.ids = {name: int(tokenizer.token_to_id(tok)) for name, tok in tokens.items()}
        self.pad_id = self.ids["pad_token"]
        self.token_ids = _TokenIds(self.ids["bos_token"], self.ids["eos_token"])
        self.control_tokens = tuple(sorted(set(tokens.values())))
        # transformers loads `tokenizer.json` with its own post-processor and ignores add_bos_token/add_eos_token
        # of the config when that file exists; padding and truncation are done here, not by the tokenizer.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._template = _compile_template(chat_template)

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> PromptBuilder:
        """Loads a processor folder (a converted checkpoint's `processor/`, or `GlmImageProcessor.save_pretrained`
        output): `tokenizer.json`, `tokenizer_config.json`, the chat template (`chat_template.jinja`,
        `chat_template.json`, or inside `processor_config.json` / `tokenizer_config.json`) and the image-processor
        values (`preprocessor_config.json` or `processor_config.json["image_processor"]`)."""
        from tokenizers import Tokenizer
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: processor folder not found")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file}: missing (the AR tokenizer of the processor folder)")
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise ValueError(f"{tok_file}: not a valid tokenizers file ({_one_line(e)[:200]})") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file}: missing (special tokens of the AR tokenizer)")
        tok_cfg = _read_json(cfg_file)
        proc_file = os.path.join(path, "processor_config.json")
        proc_cfg = _read_json(proc_file) if os.path.isfile(proc_file) else {}

        template = None
        jinja_file, json_file = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(json_file):
            template = _read_json(json_file).get("chat_template")
            if not isinstance(template, str):
                raise ValueError(f"{json_file}: no chat_template string")
        else:
            template = proc_cfg.get("chat_template") or tok_cfg.get("chat_template")
        if not isinstance(template, str) or not template:
            raise FileNotFoundError(f"{jinja_file}: missing (no chat template in the processor folder)")

        pre_file = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre_file):
            image_cfg = ImageProcessorConfig.from_dict(_read_json(pre_file), pre_file)
        elif isinstance(proc_cfg.get("image_processor"), dict):
            image_cfg = ImageProcessorConfig.from_dict(proc_cfg["image_processor"], proc_file)
        else:
            raise FileNotFoundError(f"{pre_file}: missing (no image-processor values in the processor folder)")
        try:
            _compile_template(template)
        except Exception as e:  # noqa: BLE001 (jinja2 syntax errors)
            raise ValueError(f"{path}: the chat template does not compile ({_one_line(e)})") from None
        return cls(tokenizer, tok_cfg, template, image_cfg, source=cfg_file)

    @classmethod
    def tiny(cls) -> PromptBuilder:
        """The builder of the tiny model (`glm_jax.tiny`): byte-level tokenizer with the tiny id layout, the real
        chat template, the real preprocessor values with min/max pixels 32^2/128^2."""
        from glm_jax.tiny import write_tiny_processor
        with tempfile.TemporaryDirectory() as d:
            write_tiny_processor(d)
            return cls.from_dir(d)

    # -- validation ------------------------------------------------------------------------------------------

    def check_target_size(self, height: int, width: int) -> None:
        """Raises when the target size is not a multiple of 32 or outside the processor's side range."""
        lo, hi = self.image_config.shortest_edge, self.image_config.longest_edge
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v % AR_FACTOR:
                raise ValueError(f"{name} {v} is not a multiple of {AR_FACTOR}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} {v} is outside the model's range [{lo}, {hi}] "
                                 f"(min_pixels/max_pixels of the image processor)")

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a string")
            for tok in self.control_tokens:
                if tok in p:
                    raise ValueError(f"prompt {i} contains the control token {tok!r}")
        return list(prompts)

    # -- building --------------------------------------------------------------------------------------------

    def render(self, prompt: str, n_sources: int = 0) -> str:
        """The chat template applied to one user message (`n_sources` images, then the prompt text)."""
        content = [{"type": "image"} for _ in range(n_sources)] + [{"type": "text", "text": prompt}]
        return self._template.render(messages=[{"role": "user", "content": content}], tools=None,
                                     documents=None, add_generation_prompt=False, **self.tokens)

    def build(self, prompts: Sequence[str], height: int, width: int,
              sources: Sequence[Sequence] | None = None) -> PromptBatch:
        """t2i when `sources` is None, else i2i (every sample needs the same, non-zero number of sources)."""
        prompts = self._check_prompts(prompts)
        self.check_target_size(height, width)
        (th, tw), (ph, pw) = target_grids(height, width)
        if sources is None:
            grids = [[(1, th, tw), (1, ph, pw)] for _ in prompts]
            texts = [self.render(p) for p in prompts]
            return self._finish(texts, grids, height, width, preview=(ph, pw))

        sources = [list(s) for s in sources]
        if len(sources) != len(prompts):
            raise ValueError(f"got {len(sources)} source-image lists for {len(prompts)} prompts")
        counts = [len(s) for s in sources]
        if 0 in counts:
            raise ValueError(f"mixed text-to-image and image-to-image samples in one batch (sources per sample: "
                             f"{counts}); build them as separate batches")
        if len(set(counts)) != 1:
            raise ValueError(f"every sample needs the same number of source images, got {counts}")
        cfg = self.image_config
        rows, src_grids, vae = [], [], []
        for b, imgs in enumerate(sources):
            sg, sv = [], []
            for k, img in enumerate(imgs):
                where = f"sample {b} source {k}"
                pil = _to_pil_rgb(img, where, cfg.do_convert_rgb)
                if (why := source_agreement(pil.height, pil.width, cfg)) is not None:
                    hint = _suggest_size(pil.height, pil.width, cfg)
                    hint = f", e.g. {hint[1]}x{hint[0]}" if hint else ""
                    raise ValueError(
                        f"{where} is {pil.width}x{pil.height} (WxH): {why}; use sides that are multiples of "
                        f"{AR_FACTOR} in [{cfg.shortest_edge}, {cfg.longest_edge}] with aspect ratio <= 4{hint}")
                r, g = ar_pixel_values(pil, cfg)
                rows.append(r)
                sg.append(g)
                sv.append(vae_source(pil if pil.mode == "RGB" else pil.convert("RGB")))
            src_grids.append(sg)
            vae.append(sv)
        grids = [[(1, gh, gw) for gh, gw in sg] + [(1, th, tw)] for sg in src_grids]
        texts = [self.render(p, n) for p, n in zip(prompts, counts)]
        return self._finish(texts, grids, height, width, preview=None, pixel_values=np.concatenate(rows),
                            source_grids=src_grids, vae_sources=vae)

    def build_t2i(self, prompts: Sequence[str], height: int, width: int) -> PromptBatch:
        """Text-to-image batch: `{prompt}<sop>th tw<eop><sop>ph pw<eop><bos>` per sample."""
        return self.build(prompts, height, width)

    def build_i2i(self, prompts: Sequence[str], sources: Sequence[Sequence], height: int, width: int
                  ) -> PromptBatch:
        """Image-to-image batch: `sources[b]` are sample b's source images (PIL or uint8 numpy), in order."""
        if sources is None:
            raise ValueError("build_i2i needs source images; use build_t2i for text-to-image")
        return self.build(prompts, height, width, sources)

    def _finish(self, texts: list[str], grids: list[list[GridTHW]], height: int, width: int, *,
                preview: Grid | None, **extra) -> PromptBatch:
        n_src = len(grids[0]) - (2 if preview is not None else 1)
        full = []
        image_token = self.tokens["image_token"]
        for i, (text, gs) in enumerate(zip(texts, grids)):
            parts = text.split(image_token)              # expand each placeholder to gh*gw copies, in order
            if len(parts) - 1 != n_src:
                raise ValueError(f"the chat template gave {len(parts) - 1} image placeholders for sample {i}, "
                                 f"expected {n_src}")
            text = parts[0] + "".join(image_token * (gh * gw) + part for (_, gh, gw), part in zip(gs, parts[1:]))
            (th, tw) = gs[n_src][1:]
            text += f"{self.tokens['grid_bos_token']}{th} {tw}{self.tokens['grid_eos_token']}"
            if preview is not None:
                text += f"{self.tokens['grid_bos_token']}{preview[0]} {preview[1]}{self.tokens['grid_eos_token']}"
            full.append(text + self.tokens["bos_token"])
        # transformers' processor skips the tokenizer's special tokens when the rendered prompt starts with BOS
        add_special = not texts[0].startswith(self.tokens["bos_token"])
        encs = [self.tokenizer.encode(t, add_special_tokens=add_special).ids for t in full]
        n = max(len(e) for e in encs)
        input_ids = np.full((len(encs), n), self.pad_id, np.int32)
        mask = np.zeros((len(encs), n), np.int32)
        for i, e in enumerate(encs):
            input_ids[i, n - len(e):] = e
            mask[i, n - len(e):] = 1
        pos, start = P.prompt_position_ids(input_ids, mask, grids, self.token_ids)
        gen = P.generation_grids(input_ids, mask, grids, self.token_ids)
        dec = P.decode_position_ids(start, gen)
        target = tuple(grids[0][n_src][1:])
        return PromptBatch(
            texts=full, input_ids=input_ids, attention_mask=mask, image_grids=grids, gen_grids=gen,
            position_ids=pos, decode_start=start, decode_position_ids=dec.astype(np.int32),
            num_new_tokens=P.num_generated_tokens(gen[0]), height=height, width=width, target_grid=target,
            preview_grid=preview, target_offset=preview[0] * preview[1] if preview else 0, **extra)


def _compile_template(template: str):
    """A chat template compiled the way transformers compiles it (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
