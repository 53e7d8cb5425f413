"""Declarative key maps between PyTorch state-dict names and glm_jax parameter paths.

A `Rule` pairs a torch key pattern with a glm_jax path pattern and a transform; `{i}`, `{j}`, `{k}` (any name in
braces) stand for integer indices and must appear in both patterns. The same table converts in both directions:

    Rule("model.language_model.layers.{i}.self_attn.q_proj.weight", "text.layers.{i}.attn.q_proj.kernel", LINEAR)

glm_jax paths are the `nnx` state paths of the model joined by dots (list indices are plain integers).

Transforms (all exact, invertible without extra information):
  COPY    the array as is (embeddings, norm weights, biases)
  LINEAR  2-D transpose: torch `nn.Linear.weight (out, in)` <-> kernel `(in, out)`
  CONV    4-D: torch `Conv2d.weight (O, I, kh, kw)` <-> kernel `(kh, kw, I, O)` (HWIO)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

COPY, LINEAR, CONV = "copy", "linear", "conv"

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> tuple[re.Pattern, tuple[str, ...]]:
    names: list[str] = []
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(rf"(?P<{m.group(1)}>\d+)")
        names.append(m.group(1))
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z"), tuple(names)


@dataclass(frozen=True)
class Rule:
    torch: str
    jax: str
    transform: str = COPY
    _torch_re: re.Pattern = field(init=False, repr=False, compare=False)
    _jax_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.transform not in (COPY, LINEAR, CONV):
            raise ValueError(f"unknown transform {self.transform!r} in rule for {self.torch}")
        t_re, t_names = _compile(self.torch)
        j_re, j_names = _compile(self.jax)
        if sorted(t_names) != sorted(j_names):
            raise ValueError(f"placeholders differ between {self.torch!r} and {self.jax!r}")
        object.__setattr__(self, "_torch_re", t_re)
        object.__setattr__(self, "_jax_re", j_re)

    def match_torch(self, key: str) -> str | None:
        m = self._torch_re.match(key)
        return None if m is None else self.jax.format(**m.groupdict())

    def match_jax(self, path: str) -> str | None:
        m = self._jax_re.match(path)
        return None if m is None else self.torch.format(**m.groupdict())


def torch_to_jax_array(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == COPY:
        return x
    if transform == LINEAR:
        if x.ndim != 2:
            raise ValueError(f"LINEAR expects a 2-D weight, got shape {x.shape}")
        return np.ascontiguousarray(x.T)
    if x.ndim != 4:
        raise ValueError(f"CONV expects a 4-D weight, got shape {x.shape}")
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def jax_to_torch_array(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == COPY:
        return x
    if transform == LINEAR:
        return np.ascontiguousarray(x.T)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def torch_shape_to_jax(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == LINEAR and len(shape) == 2:
        return (shape[1], shape[0])
    if transform == CONV and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(shape)


def torch_shape_for(jax_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Inverse of `torch_shape_to_jax`."""
    if transform == "linear" and len(jax_shape) == 2:
        return (jax_shape[1], jax_shape[0])
    if transform == "conv" and len(jax_shape) == 4:
        return (jax_shape[3], jax_shape[2], jax_shape[0], jax_shape[1])
    return tuple(jax_shape)


def find_torch(rules: list[Rule], key: str) -> tuple[str, Rule] | None:
    """The glm_jax path and rule for a torch key, or None when no rule matches."""
    for rule in rules:
        path = rule.match_torch(key)
        if path is not None:
            return path, rule
    return None


def find_jax(rules: list[Rule], path: str) -> tuple[str, Rule] | None:
    """The torch key and rule for a glm_jax path, or None when no rule matches."""
    for rule in rules:
        key = rule.match_jax(path)
        if key is not None:
            return key, rule
    return None
