"""Minimal safetensors reader / writer on numpy memory maps.

Why not `safetensors.numpy`: it has no bfloat16 for numpy, and loading a slice must
not read the whole tensor. The format is: 8-byte little-endian header length N, N
bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...},
then the raw little-endian data (offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed or inconsistent safetensors file (message names file / tensor)."""


class SafeFile:
  """Lazily mapped tensors of one .safetensors file: `file.get(name)` is a view."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
      raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self.header = header
    self._base = 8 + n
    self._mm = None

  def keys(self):
    return self.header.keys()

  def check(self) -> None:
    """Every tensor's dtype is readable and its bytes match its shape and lie inside the
    file (a truncated download fails here, without reading any tensor)."""
    size = os.path.getsize(self.path)
    for name, info in self.header.items():
      code = info.get("dtype")
      if code not in _DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
      begin, end = info["data_offsets"]
      if end - begin != tensor_nbytes(info["shape"], _DTYPES[code]):
        raise SafetensorsError(f"{self.path}: tensor {name!r} byte size does not match "
                               f"shape {list(info['shape'])} x {code}")
      if self._base + end > size:
        raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                               f"{self._base + end}, the file has {size}")

  def shape(self, name: str) -> tuple:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view (pages are read when touched)."""
    info = self.header[name]
    code = info["dtype"]
    if code not in _DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._mm[self._base + begin:self._base + end]
    dt = _DTYPES[code]
    shape = tuple(info["shape"])
    if raw.size != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise SafetensorsError(f"{self.path}: tensor {name!r} byte size does not match "
                             f"shape {list(shape)} x {code}")
    return raw.view(dt).reshape(shape)


def write(path: str, tensors: Iterable[tuple[str, tuple, np.dtype]], produce,
          metadata: dict | None = None) -> None:
  """Streams tensors into `path` without holding them all in memory.

  tensors: (name, shape, dtype) in file order; produce(name) -> np.ndarray of that
  shape / dtype, called once per tensor in the same order.
  """
  header, offset, order = {}, 0, []
  for name, shape, dtype in tensors:
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
      raise SafetensorsError(f"tensor {name!r}: dtype {dtype} cannot be saved")
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    order.append((name, tuple(shape), dtype))
    offset += size
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in order:
      arr = np.ascontiguousarray(produce(name))
      if arr.shape != shape or arr.dtype != dtype:
        raise SafetensorsError(f"tensor {name!r}: produced {arr.shape} {arr.dtype}, "
                               f"declared {shape} {dtype}")
      arr.tofile(f)
  os.replace(tmp, path)


def tensor_nbytes(shape, dtype) -> int:
  return np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
