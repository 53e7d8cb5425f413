"""Training data: prompt / target-image (/ source-image) datasets, validated before training, and a per-process,
checkpointable batch iterator.

Layouts (see `data/README.md` for the full description):

* folder: `prompts.txt` + `target_images/{i}.{png,jpg,jpeg,webp}` (+ `source_images/{i}.*` or `{i}_{k}.*` for
  I2I, several sources ordered by k); the eval split is `eval_prompts.txt` + `eval_target_images/` (+
  `eval_source_images/`).
* manifest: a `.jsonl` file, one `{"prompt": ..., "target": ..., "sources": [...]}` object per line, paths relative
  to the manifest's folder.

**Index rule.** The prompt on 0-based line `i` of the file (line `i + 1` as an editor shows it) pairs with image
index `i`. Blank (or whitespace-only) lines are skipped but still counted, so a blank line never re-pairs the
lines after it. An image whose index is a blank line or past the end of the file is an error (its prompt is missing,
or the pairing is off by a line). The same rule numbers manifest lines.

`load_dataset` checks the layout first (every problem found is collected; the first is raised as a one-line
`DataError` naming the file and line), then opens every image with PIL (`verify()` and a full decode) and applies
the caller's size rules. `DataIterator` shuffles deterministically per epoch from a seed and gives each process
a contiguous slice of every global batch; `state()` / `restore()` make resume exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MODES = ("t2i", "i2i")
SPLITS = {
    "train": ("prompts.txt", "target_images", "source_images"),
    "eval": ("eval_prompts.txt", "eval_target_images", "eval_source_images"),
}
MANIFEST_KEYS = ("prompt", "target", "sources")

Size = tuple[int, int]                                 # (width, height), PIL's order
SizeCheck = Callable[[str, Size], "str | None"]        # (path, (w, h)) -> None if fine, else what is wrong


class DataError(ValueError):
    """A dataset problem. The message is the first problem on one line (file and line named); `problems` has all
    of them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        more = len(self.problems) - 1
        super().__init__(self.problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


@dataclass(frozen=True)
class Example:
    """One prompt with its target image and, for I2I, its source images (paths; sizes as (w, h) once checked).
    `where` is `file:line` (1-based line) of the prompt, for messages."""

    index: int
    prompt: str
    target: str
    sources: tuple[str, ...] = ()
    target_size: Size = (0, 0)
    source_sizes: tuple[Size, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class Dataset:
    """Validated examples of one split, in file order."""

    mode: str
    split: str
    path: str                      # the prompts file or manifest
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def size_counts(self) -> dict[str, dict[Size, int]]:
        """How many target / source images have each size."""
        return {"target": dict(Counter(e.target_size for e in self.examples)),
                "source": dict(Counter(s for e in self.examples for s in e.source_sizes))}

    def summary(self) -> str:
        """One line: count, mode and image sizes, for the start-up log."""
        def fmt(c: dict[Size, int]) -> str:
            top = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
            text = ", ".join(f"{w}x{h} x{n}" for (w, h), n in top[:4])
            return text + (f", {len(top) - 4} more sizes" if len(top) > 4 else "")
        counts = self.size_counts()
        line = f"{self.path}: {len(self)} {self.mode} {self.split} examples; targets {fmt(counts['target'])}"
        return line + (f"; sources {fmt(counts['source'])}" if counts["source"] else "")

    def fingerprint(self) -> str:
        """A short hash of the prompts and image file names: a resumed iterator checks it is the same data."""
        h = hashlib.sha256()
        for e in self.examples:
            names = [os.path.basename(e.target)] + [os.path.basename(s) for s in e.sources]
            h.update(json.dumps([e.index, e.prompt, names]).encode())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- size rules

def size_rule(*, multiple: int = 1, min_side: int = 1, max_side: int | None = None) -> SizeCheck:
    """A `check_source` / `check_target` callable: both sides multiples of `multiple`, the shorter side at least
    `min_side`, the longer at most `max_side`. E.g. the real GLM-Image I2I agreement rule is
    `size_rule(multiple=32, min_side=512, max_side=2048)`."""
    def check(path: str, size: Size) -> str | None:
        w, h = size
        if w % multiple or h % multiple:
            return f"sides must be multiples of {multiple}"
        if min(w, h) < min_side:
            return f"shorter side must be at least {min_side}"
        if max_side is not None and max(w, h) > max_side:
            return f"longer side must be at most {max_side}"
        return None
    return check


# -------------------------------------------------------------------------------------------------------- reading

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_lines(path: str) -> list[str]:
    """Lines split on '\\n' only (so line numbers are an editor's), '\\r' and a UTF-8 BOM removed."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    out = []
    for n, b in enumerate(lines):
        try:
            out.append(b.decode("utf-8-sig" if n == 0 else "utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise DataError([f"{path}:{n + 1}: not valid UTF-8 ({_one_line(exc)})"]) from None
    if out and out[-1] == "":
        out.pop()                                  # the final newline ends the last line
    return out


def _prompt_lines(path: str) -> list[tuple[int, str]]:
    """(0-based line index, prompt) for each non-blank line."""
    return [(i, s.strip()) for i, s in enumerate(_read_lines(path)) if s.strip()]


def _image_files(folder: str) -> list[str]:
    """Image file names (by extension, any case) in `folder`; hidden files skipped."""
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTS
                  and os.path.isfile(os.path.join(folder, n)))


def _index_targets(folder: str, problems: list[str]) -> tuple[dict[int, str], dict[int, list[str]]]:
    """`{i}.ext` -> ({i: path}, {i: names of two or more files for i}); wrong names are problems."""
    found: dict[int, list[str]] = {}
    for name in _image_files(folder):
        stem = os.path.splitext(name)[0]
        if not stem.isdigit():
            problems.append(f"{os.path.join(folder, name)}: a target image must be named {{i}}.png/.jpg/.jpeg/.webp "
                            "with i the prompt's 0-based line index")
            continue
        found.setdefault(int(stem), []).append(name)
    return ({i: os.path.join(folder, names[0]) for i, names in found.items()},
            {i: names for i, names in found.items() if len(names) > 1})


def _index_sources(folder: str, problems: list[str]) -> tuple[dict[int, list[str]], dict[int, str]]:
    """`{i}.ext` or `{i}_{k}.ext` -> ({i: paths ordered by k}, {i: what is ambiguous}); wrong names are problems."""
    found: dict[int, dict[int | None, list[str]]] = {}
    for name in _image_files(folder):
        stem = os.path.splitext(name)[0]
        i_txt, sep, k_txt = stem.partition("_")
        if not i_txt.isdigit() or (sep and not k_txt.isdigit()):
            problems.append(f"{os.path.join(folder, name)}: a source image must be named {{i}}.ext or {{i}}_{{k}}.ext "
                            "with i the prompt's 0-based line index and k its order")
            continue
        found.setdefault(int(i_txt), {}).setdefault(int(k_txt) if sep else None, []).append(name)
    out, bad = {}, {}
    for i, by_k in found.items():
        if None in by_k and len(by_k) > 1:
            bad[i] = f"both {by_k[None][0]} and {{i}}_{{k}} names (use one naming)"
        for names in by_k.values():
            if len(names) > 1:
                bad[i] = f"two images for one source slot: {', '.join(names)} (keep one)"
        out[i] = [os.path.join(folder, by_k[k][0]) for k in sorted(by_k, key=lambda k: -1 if k is None else k)]
    return out, bad


def _folder_examples(root: str, mode: str, split: str) -> tuple[str, list[Example]]:
    prompts_name, target_name, source_name = SPLITS[split]
    prompts_path = os.path.join(root, prompts_name)
    target_dir, source_dir = os.path.join(root, target_name), os.path.join(root, source_name)
    if not os.path.isfile(prompts_path):
        raise DataError([f"{prompts_path}: not found (a dataset folder holds {prompts_name} and {target_name}/)"])
    prompts = _prompt_lines(prompts_path)
    if not prompts:
        raise DataError([f"{prompts_path}:1: the prompts file is empty"])
    n_lines = prompts[-1][0] + 1
    if not os.path.isdir(target_dir):
        raise DataError([f"{target_dir}: not found (the target image of prompt line i is {target_name}/{{i}}.png)"])
    problems: list[str] = []
    targets, dup_targets = _index_targets(target_dir, problems)
    sources: dict[int, list[str]] = {}
    bad_sources: dict[int, str] = {}
    has_sources = os.path.isdir(source_dir)
    if has_sources:
        sources, bad_sources = _index_sources(source_dir, problems)
    if mode == "t2i" and sources:
        i = min(sources)
        problems.append(f"{prompts_path}:{i + 1}: a t2i dataset has source image {sources[i][0]} "
                        "(train in mode 'i2i', or remove the source images)")
    lines = dict(prompts)
    examples = []
    for i, prompt in prompts:
        where = f"{prompts_path}:{i + 1}"
        if i not in targets:
            problems.append(f"{where}: no target image {target_dir}/{i}.{{png,jpg,jpeg,webp}}")
        elif i in dup_targets:
            problems.append(f"{where}: two target images for index {i} in {target_dir}: "
                            f"{', '.join(dup_targets[i])} (keep one)")
        if mode == "i2i":
            if i not in sources:
                what = "" if has_sources else f" ({source_dir} not found)"
                problems.append(f"{where}: no source image {source_dir}/{i}.png (or {i}_0.png, {i}_1.png, ...){what}")
            elif i in bad_sources:
                problems.append(f"{where}: source images in {source_dir}: {bad_sources[i]}")
        examples.append(Example(i, prompt, targets.get(i, ""), tuple(sources.get(i, ()) if mode == "i2i" else ()),
                                where=where))
    orphans = [("target", targets)] + ([("source", {i: p[0] for i, p in sources.items()})] if mode == "i2i" else [])
    for kind, index in orphans:
        for i in sorted(set(index) - set(lines)):
            why = f"line {i + 1} is blank" if i < n_lines else f"it has {n_lines} lines"
            problems.append(f"{index[i]}: {kind} image without a prompt: {prompts_path}:{i + 1} ({why})")
    if problems:
        raise DataError(problems)
    return prompts_path, examples


def _manifest_examples(path: str, mode: str) -> list[Example]:
    root = os.path.dirname(path)
    problems: list[str] = []
    examples = []
    for i, line in enumerate(_read_lines(path)):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({_one_line(exc)})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object with keys {', '.join(MANIFEST_KEYS)}")
            continue
        unknown = sorted(set(rec) - set(MANIFEST_KEYS))
        need = ("prompt", "target", "sources") if mode == "i2i" else ("prompt", "target")
        missing = [k for k in need if k not in rec]
        if unknown or missing:
            what = "; ".join(([f"missing key {', '.join(missing)}"] if missing else [])
                             + ([f"unknown key {', '.join(unknown)}"] if unknown else []))
            keys = ", ".join(need) + ("" if mode == "i2i" else ", optional sources (empty)")
            problems.append(f"{where}: {what} (keys: {keys})")
            continue
        prompt, target, srcs = rec["prompt"], rec["target"], rec.get("sources", [])
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: \"prompt\" must be a non-empty string")
            continue
        if not isinstance(target, str) or not target:
            problems.append(f"{where}: \"target\" must be a path string")
            continue
        if not isinstance(srcs, list) or not all(isinstance(s, str) and s for s in srcs):
            problems.append(f"{where}: \"sources\" must be a list of path strings")
            continue
        if mode == "t2i" and srcs:
            problems.append(f"{where}: a t2i dataset has \"sources\" (train in mode 'i2i', or drop them)")
            continue
        if mode == "i2i" and not srcs:
            problems.append(f"{where}: an i2i example needs at least one path in \"sources\"")
            continue
        paths = [os.path.join(root, p) for p in [target, *srcs]]
        gone = [p for p in paths if not os.path.isfile(p)]
        if gone:
            problems.append(f"{where}: image not found: {gone[0]}")
            continue
        examples.append(Example(i, prompt.strip(), paths[0], tuple(paths[1:]), where=where))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([f"{path}:1: the manifest is empty"])
    return examples


def probe_image(path: str) -> Size:
    """(w, h) of an image after PIL `verify()` and a full decode (catches truncated and corrupt files); EXIF
    rotations count, as in `read_image`. Raises OSError / ValueError on a bad file."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):     # EXIF orientation with a 90-degree turn
            w, h = h, w
    return w, h


def read_image(path: str) -> np.ndarray:
    """The image as stored (EXIF orientation applied, no resize) as uint8 RGB `[H, W, 3]`; alpha is dropped."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


PROGRESS_FROM = 1000     # datasets with at least this many images say that they are being checked


def _check_images(examples: list[Example], check_target: SizeCheck | None, check_source: SizeCheck | None,
                  workers: int | None, log: Callable[[str], None] | None = None, where: str = "") -> list[Example]:
    paths = sorted({p for e in examples for p in (e.target, *e.sources)})

    def probe(p: str) -> Size | str:
        try:
            return probe_image(p)
        except Exception as exc:  # noqa: BLE001 -- a corrupt file makes PIL raise many types; all mean unreadable
            return _one_line(exc)

    workers = workers or min(32, os.cpu_count() or 1)     # PIL decodes outside the GIL
    bar = None
    if log is not None and len(paths) >= PROGRESS_FROM:
        log(f"data: {where}: checking {len(paths)} images (full decode, {workers} threads)")
        if sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=len(paths), desc="checking images", unit="image", file=sys.stderr, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sizes = {}
        for p, got in zip(paths, pool.map(probe, paths)):
            sizes[p] = got
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    problems = []
    out = []
    for e in examples:
        for kind, p, rule in [("target", e.target, check_target)] + [("source", s, check_source) for s in e.sources]:
            got = sizes[p]
            if isinstance(got, str):
                problems.append(f"{e.where}: {kind} image {p} is unreadable: {got}")
            elif rule is not None and (msg := rule(p, got)):
                problems.append(f"{e.where}: {kind} image {p} is {got[0]}x{got[1]}: {msg}")
        if not problems:
            out.append(Example(e.index, e.prompt, e.target, e.sources, sizes[e.target],
                               tuple(sizes[s] for s in e.sources), e.where))
    if problems:
        raise DataError(problems)
    return out


def load_dataset(path: str, mode: str, split: str = "train", *, check_target: SizeCheck | None = None,
                 check_source: SizeCheck | None = None, workers: int | None = None,
                 log: Callable[[str], None] | None = None) -> Dataset:
    """Validates a dataset folder (split `train` or `eval`) or `.jsonl` manifest and returns its examples with
    image sizes. Every problem is collected; the first is raised as a one-line `DataError` naming file and line.
    `check_target` / `check_source(path, (w, h))` return None or what is wrong with that size (see `size_rule`).
    With `log`, a dataset of `PROGRESS_FROM` images or more says that its images are being checked (and shows a
    progress bar on a terminal)."""
    if mode not in MODES:
        raise DataError([f"mode {mode!r} is not one of {MODES}"])
    if split not in SPLITS:
        raise DataError([f"split {split!r} is not one of {tuple(SPLITS)}"])
    if os.path.isdir(path):
        where, examples = _folder_examples(path, mode, split)   # (a manifest is one split; `split` is a label)
    elif path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise DataError([f"{path}: manifest not found"])
        where, examples = path, _manifest_examples(path, mode)
    else:
        raise DataError([f"{path}: not a dataset folder or a .jsonl manifest"])
    examples = _check_images(examples, check_target, check_source, workers, log, where)
    return Dataset(mode, split, where, tuple(examples))


def has_eval_split(path: str) -> bool:
    """Whether a dataset folder has an eval split (`eval_prompts.txt`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SPLITS["eval"][0]))


def load_splits(path: str, mode: str, eval_path: str = "", **kw: Any) -> tuple[Dataset, Dataset | None]:
    """(train, eval) as the config's `data.path` / `data.eval_path` describe them: eval_path "" means the eval
    split of `path` if it has one (else no eval); a folder eval_path gives its eval split if it has one, else its
    `prompts.txt`; a manifest eval_path is read whole."""
    train = load_dataset(path, mode, "train", **kw)
    if not eval_path:
        return train, (load_dataset(path, mode, "eval", **kw) if has_eval_split(path) else None)
    plain_folder = os.path.isdir(eval_path) and not has_eval_split(eval_path)
    return train, load_dataset(eval_path, mode, "train" if plain_folder else "eval", **kw)


# ------------------------------------------------------------------------------------------------------ iterator

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a version-independent hash for shuffling."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of the n examples in `epoch`: a permutation that depends only on (seed, epoch), computed
    by sorting keyed hashes (no RNG library whose stream could change between versions)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    key = _mix64(np.array([(seed & (2**64 - 1)) ^ 0x9E3779B97F4A7C15], np.uint64))
    key = _mix64(key ^ np.uint64(epoch & (2**64 - 1)))
    with np.errstate(over="ignore"):
        h = _mix64(np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key)
    return np.argsort(h, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class Batch:
    """This process's slice of one global batch. Images are uint8 RGB `[H, W, 3]` as stored (sizes may differ);
    `sources[j]` lists example j's source images (empty for T2I). `valid[j]` is False for padding (eval only).
    `rows` is the slice's place in the global batch, `global_prompts` the prompts of the whole global batch (no
    I/O: every process computes the same global conditioning from them) and `global_sources` its sources when the
    iterator was made with `global_sources=True` (with one process: the same objects as `sources`)."""

    prompts: tuple[str, ...]
    targets: tuple[np.ndarray, ...]
    sources: tuple[tuple[np.ndarray, ...], ...]
    indices: np.ndarray            # dataset positions, int64
    valid: np.ndarray              # bool
    epoch: int
    position: int                  # the global batch's index within its epoch
    rows: slice = field(default_factory=lambda: slice(None))   # its rows within the global batch
    global_prompts: tuple[str, ...] = ()                        # the prompts of the whole global batch
    global_sources: tuple[tuple[np.ndarray, ...], ...] = ()     # ... and their sources (`global_sources=True`)


class DataIterator:
    """Batches of `groups_per_batch` examples (global, over all processes), deterministic and resumable.

    Each epoch is `epoch_order(n, seed, epoch)`; global batch b of the epoch is positions [b·B, (b+1)·B) of that
    order, and process p takes the contiguous slice [p·B/P, (p+1)·B/P) of it (B = groups_per_batch must be a
    multiple of P = process_count). So the P processes see disjoint slices whose union is the global batch, and
    the stream does not depend on P. Training (`repeat`, `drop_remainder`) runs epochs forever and drops the last
    n mod B examples of each epoch (a different set each epoch when shuffled); eval (no repeat, no drop) makes one
    pass whose last global batch is padded with copies of its last example, marked `valid=False`.
    """

    def __init__(self, dataset: Dataset, groups_per_batch: int, *, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
                 load_images: bool = True, workers: int | None = None, global_sources: bool = False):
        b, n = groups_per_batch, len(dataset)
        if b < 1:
            raise DataError([f"groups_per_batch must be >= 1, got {b}"])
        if not 0 <= process_index < process_count:
            raise DataError([f"process_index {process_index} not in [0, process_count={process_count})"])
        if b % process_count:
            raise DataError([f"groups_per_batch {b} is not a multiple of process_count {process_count}"])
        if n == 0 or (drop_remainder and n < b):
            raise DataError([f"{dataset.path}: {n} examples, fewer than one global batch of {b}"])
        self.dataset, self.batch_size = dataset, b
        self.seed, self.shuffle, self.repeat, self.drop_remainder = int(seed), shuffle, repeat, drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self.load_images, self.workers = load_images, workers or min(8, os.cpu_count() or 1)
        self.global_sources = global_sources
        self.batches_per_epoch = n // b if drop_remainder else -(-n // b)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    # -- where we are
    def state(self) -> dict[str, Any]:
        """A small JSON-able dict: `restore` of it continues with the next batch exactly."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "shuffle": self.shuffle,
                "groups_per_batch": self.batch_size, "examples": len(self.dataset),
                "fingerprint": self.dataset.fingerprint()}

    def restore(self, state: dict[str, Any], *, strict: bool = True) -> DataIterator:
        """Continues from `state()`. A different dataset, batch size or shuffle flag cannot resume exactly: a
        `DataError` (or, with strict=False, a warning and the same epoch / position on the new setting)."""
        mine = self.state()
        diff = [f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in ("shuffle", "groups_per_batch", "examples",
                                                                  "fingerprint") if state.get(k) != mine[k]]
        if diff:
            msg = f"data iterator state does not match this dataset / batch ({'; '.join(diff)})"
            if strict:
                raise DataError([msg + ": resume cannot be exact"])
            warnings.warn(msg + ": continuing from the saved epoch and position", stacklevel=2)
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = min(int(state["position"]), self.batches_per_epoch)
        self._order = None
        return self

    # -- indices
    def order(self, epoch: int) -> np.ndarray:
        """The global example order of `epoch` (cached for the current one)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), self.seed, epoch, self.shuffle))
        return self._order[1]

    def global_indices(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, valid) of global batch `position` of `epoch`, padded to the batch size."""
        order = self.order(epoch)
        chunk = order[position * self.batch_size:(position + 1) * self.batch_size]
        valid = np.ones(self.batch_size, bool)
        valid[len(chunk):] = False
        chunk = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[-1], np.int64)])
        return chunk, valid

    def local_slice(self) -> slice:
        """This process's part of every global batch."""
        per = self.batch_size // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    # -- iteration
    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        if self.position >= self.batches_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
        idx, valid = self.global_indices(self.epoch, self.position)
        batch = self._make(idx, valid, self.local_slice(), self.epoch, self.position)
        self.position += 1
        return batch

    def _make(self, idx_g: np.ndarray, valid_g: np.ndarray, sl: slice, epoch: int, position: int) -> Batch:
        everyone = [self.dataset[int(i)] for i in idx_g]
        exs = everyone[sl]
        idx, valid = idx_g[sl], valid_g[sl]
        all_sources = self.global_sources and self.process_count > 1
        targets, sources, global_sources = (), (), ()
        if self.load_images:
            paths = {p for e in exs for p in (e.target, *e.sources)}
            if all_sources:
                paths |= {s for e in everyone for s in e.sources}
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                img = dict(zip(sorted(paths), pool.map(read_image, sorted(paths))))
            targets = tuple(img[e.target] for e in exs)
            sources = tuple(tuple(img[s] for s in e.sources) for e in exs)
            if self.global_sources:
                global_sources = (tuple(tuple(img[s] for s in e.sources) for e in everyone) if all_sources
                                  else sources)
        return Batch(tuple(e.prompt for e in exs), targets, sources, idx.copy(), valid.copy(), epoch, position,
                     rows=sl, global_prompts=tuple(e.prompt for e in everyone), global_sources=global_sources)


def train_iterator(dataset: Dataset, groups_per_batch: int, *, seed: int = 0, shuffle: bool = True,
                   process_index: int = 0, process_count: int = 1, **kw: Any) -> DataIterator:
    """Endless shuffled epochs of full global batches (see `DataIterator` for the sharding rule)."""
    return DataIterator(dataset, groups_per_batch, seed=seed, shuffle=shuffle, repeat=True, drop_remainder=True,
                        process_index=process_index, process_count=process_count, **kw)


def eval_iterator(dataset: Dataset, groups_per_batch: int, *, process_index: int = 0, process_count: int = 1,
                  **kw: Any) -> DataIterator:
    """One pass in file order, nothing dropped; the last batch is padded (`valid=False`) so every process has
    the same batch shape."""
    return DataIterator(dataset, groups_per_batch, shuffle=False, repeat=False, drop_remainder=False,
                        process_index=process_index, process_count=process_count, **kw)
