"""Reading and streaming-writing safetensors files, one tensor at a time.

The `safetensors` package reads lazily (`safe_open`) but only writes a whole
dict of tensors at once, which for an export would mean a second full copy of
the model. The format is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw bytes, so the
writer below computes the header from shapes and streams each tensor.
"""

import json
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

_CODES = {
  np.dtype(np.float32): "F32",
  np.dtype(ml_dtypes.bfloat16): "BF16",
  np.dtype(np.float16): "F16",
  np.dtype(np.float64): "F64",
  np.dtype(np.int32): "I32",
  np.dtype(np.int64): "I64",
  np.dtype(np.int8): "I8",
  np.dtype(np.uint8): "U8",
}


class Tensor(NamedTuple):
  """A tensor to write: its bytes are produced only when written."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return (
      int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize
    )


def write(path, tensors: list[Tensor], metadata: dict[str, str]) -> None:
  """Writes `tensors` in order, holding at most one of them in memory."""
  header: dict[str, object] = {}  # JSON: name -> entry, __metadata__
  offset = 0
  for t in tensors:
    if np.dtype(t.dtype) not in _CODES:
      raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written")
    header[t.name] = {
      "dtype": _CODES[np.dtype(t.dtype)],
      "shape": list(t.shape),
      "data_offsets": [offset, offset + t.nbytes],
    }
    offset += t.nbytes
  header["__metadata__"] = metadata
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      value = np.ascontiguousarray(t.make(), dtype=t.dtype)
      if value.shape != tuple(t.shape):
        raise ValueError(
          f"{t.name}: produced shape {value.shape}, declared {tuple(t.shape)}"
        )
      value.tofile(f)


def shapes(path) -> dict[str, tuple[int, ...]]:
  with safe_open(str(path), framework="numpy") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (a file handle, not a dict)


def read(path, names) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for `names` in file order, one at a time."""
  with safe_open(str(path), framework="numpy") as f:
    for name in names:
      yield name, f.get_tensor(name)
