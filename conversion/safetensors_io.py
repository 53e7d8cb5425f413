"""Streaming safetensors reading and writing with numpy (bf16 through ml_dtypes); never imports torch.

Reading memory-maps the file and loads one tensor at a time. Writing takes tensor *producers*, so a sharded
checkpoint is written with one tensor in memory at a time. Malformed files raise `SafetensorsError` naming the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A malformed or unreadable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file: `keys()`, `info(key)`, `load(key)` (a copy, one tensor at a time)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 (kept open for the mmap; closed in close())
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: truncated or corrupt safetensors header (header length {n}, "
                                   f"file size {size})")
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._infos: dict[str, TensorInfo] = {}
        for key, h in header.items():
            try:
                dtype = _DTYPES[h["dtype"]]
                shape = tuple(int(s) for s in h["shape"])
                begin, end = (int(o) for o in h["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{path}: bad header entry for tensor {key!r}: {h}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise SafetensorsError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} "
                                       f"{h['dtype']}")
            if self._data_start + end > size:
                raise SafetensorsError(f"{path}: truncated file: tensor {key!r} ends at byte "
                                       f"{self._data_start + end} but the file has {size} bytes")
            self._infos[key] = TensorInfo(dtype, shape, begin, end)
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def load(self, key: str) -> np.ndarray:
        i = self._infos[key]
        buf = self._mm[self._data_start + i.begin:self._data_start + i.end]
        return np.frombuffer(buf, dtype=i.dtype).reshape(i.shape).copy()

    def close(self):
        if self._mm is not None:
            self._mm.close()
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, shape and dtype up front, and a function producing the array."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: str, tensors: list[PendingTensor], metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file, producing (and dropping) one tensor at a time."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            arr = np.ascontiguousarray(t.produce())
            if arr.shape != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise SafetensorsError(f"{path}: tensor {t.name} produced {arr.shape} {arr.dtype}, announced "
                                       f"{t.shape} {t.dtype}")
            f.write(arr.tobytes())


def write_sharded(directory: str, stem: str, tensors: Iterable[PendingTensor],
                  max_shard_size: int = 5 * 1024 ** 3) -> list[str]:
    """Writes `{stem}.safetensors`, or shards `{stem}-0000k-of-0000n.safetensors` plus
    `{stem}.safetensors.index.json` when the total exceeds `max_shard_size` bytes (transformers' naming)."""
    tensors = list(tensors)
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        write_file(os.path.join(directory, name), shards[0])
        return [name]
    n = len(shards)
    names, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        name = f"{stem}-{k:05d}-of-{n:05d}.safetensors"
        write_file(os.path.join(directory, name), shard)
        names.append(name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    names.append(f"{stem}.safetensors.index.json")
    return names


def list_weight_files(directory: str) -> list[str]:
    """The safetensors files of a HF/diffusers component directory, checked against its index if there is one.

    Raises `SafetensorsError` naming the index or the missing shard.
    """
    indexes = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise SafetensorsError(f"{directory}: several safetensors index files: {indexes}")
    if indexes:
        path = os.path.join(directory, indexes[0])
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{path}: unreadable index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(directory, name)):
                raise SafetensorsError(f"{path}: shard {name!r} is missing from {directory}")
        return [os.path.join(directory, name) for name in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise SafetensorsError(f"{directory}: no *.safetensors weights found")
    if len(files) > 1:
        raise SafetensorsError(f"{directory}: several *.safetensors files but no *.safetensors.index.json")
    return [os.path.join(directory, files[0])]
