"""``odeserve.v1`` tensors ↔ numpy arrays, and nothing else: no torch, no model knowledge.
Every problem raises a :class:`server.api.RequestError` naming the field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from odeserve.v1 import odeserve_pb2 as pb

from .api import invalid, quoted

DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
MAX_DIMENSIONS = 8
"""More than any served input needs; a larger rank is refused before numpy sees it."""
MAX_ELEMENTS = 2**32
"""More elements than any message can carry: a shape whose non-zero dimensions multiply to more
is refused (an empty tensor of shape [2**62, 2**62, 0] would overflow numpy's sizes)."""


def check_shape(shape: Sequence[int], field: str) -> list[int]:
    """A tensor's shape as a list, once its rank, signs and size are within bounds: every wire
    protocol's tensors pass here before numpy sees their shape."""
    if len(shape) > MAX_DIMENSIONS:
        raise invalid(f"{field}.shape has {len(shape)} dimensions; at most {MAX_DIMENSIONS} are accepted")
    shape = list(shape)
    if any(n < 0 for n in shape):
        raise invalid(f"{field}.shape must not be negative, got {shape}")
    if math.prod(n for n in shape if n) > MAX_ELEMENTS:
        raise invalid(
            f"{field}.shape {shape} is too large: its non-zero dimensions multiply to more than {MAX_ELEMENTS}"
        )
    return shape


def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    if tensor.dtype not in DTYPES:
        raise invalid(f"{field}.dtype must be one of {', '.join(DTYPES)}, got {quoted(tensor.dtype)}")
    shape = check_shape(tensor.shape, field)
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise invalid(
            f"{field}.data has {len(tensor.data)} bytes, but shape {shape} of {tensor.dtype} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    name = next(name for name, dtype in DTYPES.items() if dtype == array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=name, shape=list(array.shape), data=array.astype(DTYPES[name], copy=False).tobytes())
