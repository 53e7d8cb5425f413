"""Applies a key table between flat torch tensors and an `nnx` module's parameter state."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from conversion.table import (
    Rule,
    find_jax,
    find_torch,
    jax_to_torch_array,
    torch_shape_for,
    torch_shape_to_jax,
    torch_to_jax_array,
)


class ConversionError(ValueError):
    """A problem with the input of a conversion; the message names the file or key."""


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_shapes(module: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `{dotted path: ShapeDtypeStruct}` of a (possibly abstract) module's parameters."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        v = var.get_value() if hasattr(var, "get_value") else var.value
        out[path_str(path)] = jax.ShapeDtypeStruct(v.shape, v.dtype)
    return out


def convert_tensors(tensors: Iterable[tuple[str, Callable[[], np.ndarray], tuple[int, ...], str]],
                    rules: list[Rule], expected: dict[str, jax.ShapeDtypeStruct], *,
                    source: str = "checkpoint", ignore: Callable[[str], bool] = lambda k: False
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Streams `(jax path, array)` pairs from `(torch key, loader, torch shape, file)` items.

    Shapes are checked before any tensor is loaded; each tensor is loaded only when it is converted, so peak memory
    is one tensor plus whatever the caller keeps. Raises `ConversionError` naming the key and file on an unknown key,
    a wrong shape, or (after the stream ends) a missing parameter.
    """
    seen: set[str] = set()
    shapes = {p: tuple(s.shape) for p, s in expected.items()}
    for key, load, shape, fname in tensors:
        if ignore(key):
            continue
        path, rule = resolve_key(rules, key, shape, shapes, seen, fname)
        seen.add(path)
        yield path, torch_to_jax_array(load(), rule.transform)
    check_complete(rules, shapes, seen, source)


def resolve_key(rules: list[Rule], key: str, shape, expected: dict[str, tuple], seen, fname: str
                ) -> tuple[str, Rule]:
    """`(jax path, rule)` of a torch tensor, with the conversion's one-line errors (naming `fname` and the key):
    no rule maps it, the configured model has no such parameter, wrong shape, or a path already in `seen`."""
    hit = find_torch(rules, key)
    if hit is None:
        raise ConversionError(f"{fname}: unexpected key {key!r} (no rule in the key table maps it)")
    path, rule = hit
    if path not in expected:
        raise ConversionError(f"{fname}: key {key!r} maps to {path!r}, which the model configured by "
                              f"config.json does not have")
    want = tuple(expected[path])
    if torch_shape_to_jax(tuple(shape), rule.transform) != want:
        raise ConversionError(f"{fname}: tensor {key!r} has shape {tuple(shape)}, expected "
                              f"{torch_shape_for(want, rule.transform)} from config.json")
    if path in seen:
        raise ConversionError(f"{fname}: key {key!r} appears twice")
    return path, rule


def check_complete(rules: list[Rule], expected, seen, source: str) -> None:
    """Raises `ConversionError` naming up to 5 torch keys of the expected parameters that were never seen."""
    missing = sorted(set(expected) - set(seen))
    if missing:
        keys = [find_jax(rules, p) for p in missing[:5]]
        names = [k[0] if k else p for k, p in zip(keys, missing[:5], strict=True)]
        raise ConversionError(f"{source}: missing {len(missing)} tensor(s), e.g. {names}")


def load_state_dict_into(module: nnx.Module, state_dict: dict[str, np.ndarray], rules: list[Rule],
                         ignore: Callable[[str], bool] = lambda k: False) -> nnx.Module:
    """Copies a torch-named state dict (numpy arrays) into `module` in place and returns it (tests, small models)."""
    expected = param_shapes(module)
    items = ((k, (lambda v=v: np.asarray(v)), tuple(np.shape(v)), "state_dict") for k, v in state_dict.items())
    flat = dict(convert_tensors(items, rules, expected, ignore=ignore))
    state = nnx.state(module, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jax.numpy.asarray(flat[path_str(path)], dtype=expected[path_str(path)].dtype))
    nnx.update(module, state)
    return module


def torch_state_dict(module: nnx.Module, rules: list[Rule]) -> dict[str, np.ndarray]:
    """The torch-named state dict (numpy) of a module's parameters."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        p = path_str(path)
        hit = find_jax(rules, p)
        if hit is None:
            raise ConversionError(f"parameter {p!r} has no rule in the key table")
        key, rule = hit
        v = var.get_value() if hasattr(var, "get_value") else var.value
        out[key] = jax_to_torch_array(np.asarray(v), rule.transform)
    return out


def progress_bar(total: int, desc: str, unit: str = "tensor", unit_scale: bool = False):
    """A tqdm bar on stderr for a conversion's long loops, shown only on a terminal; None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())
