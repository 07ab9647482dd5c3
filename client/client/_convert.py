"""Arrays in, typed results out: tensors on the wire and the results the calls return.
numpy and the generated protocol only; no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from odeserve.v1 import odeserve_pb2 as pb

STATUS_NAMES = {value: name.removeprefix("SOLVE_STATUS_") for name, value in pb.SolveStatus.items()}
_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


@dataclass(frozen=True)
class Items:
    """Per item: function evaluations and how the solve ended ("SUCCESS", "MAX_NFE", ...)."""

    nfe: np.ndarray
    status: list[str]

    @property
    def all_succeeded(self) -> bool:
        return all(s == "SUCCESS" for s in self.status)


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class Solved:
    """The accuracy the server solved with (the request's own, the model's default, or what
    ``tol="auto"`` chose; the precision f was evaluated in), and how often the request's items
    were parked for others."""

    rtol: float
    atol: float
    method: str
    preemptions: int
    precision: str


@dataclass(frozen=True)
class ClassifyResult:
    labels: np.ndarray  # [N] int; -1 where the solve failed
    probabilities: np.ndarray  # [N, 10]
    items: Items
    timing: Timing
    model_version: str
    solved: Solved
    request_id: str = ""  # the call's id in the server's logs


@dataclass(frozen=True)
class SampleResult:
    points: np.ndarray  # [n, D]
    log_density: np.ndarray  # [n]
    items: Items
    timing: Timing
    model_version: str
    solved: Solved
    request_id: str = ""  # the call's id in the server's logs


@dataclass(frozen=True)
class LogDensityResult:
    log_density: np.ndarray  # [N]
    items: Items
    timing: Timing
    model_version: str
    solved: Solved
    request_id: str = ""  # the call's id in the server's logs


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    kind: str
    task: str
    default_tol: float
    device: str
    card: dict = field(repr=False)


def encode(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    for name, dtype in _DTYPES.items():
        if array.dtype.newbyteorder("<") == dtype:  # any byte order in; little-endian out
            return pb.Tensor(dtype=name, shape=list(array.shape), data=array.astype(dtype, copy=False).tobytes())
    raise TypeError(f"arrays must be uint8, float32 or float64, got {array.dtype}")


def decode(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=_DTYPES[tensor.dtype]).reshape(list(tensor.shape)).copy()


def images_tensor(images: npt.ArrayLike) -> pb.Tensor:
    array = np.asarray(images)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return encode(array)


def points_tensor(points: npt.ArrayLike) -> pb.Tensor:
    array = np.asarray(points)
    if array.dtype.kind != "f":
        array = array.astype(np.float32)
    return encode(array)


def items(message: pb.ItemStats) -> Items:
    return Items(np.asarray(message.nfe, dtype=np.int64), [STATUS_NAMES[s] for s in message.status])


def timing(message: pb.Timing) -> Timing:
    return Timing(message.queue_seconds, message.compute_seconds)


def solved(message: pb.Solved) -> Solved:
    return Solved(message.rtol, message.atol, message.method, message.preemptions, message.precision)


def _common(response) -> dict:
    return {
        "items": items(response.items),
        "timing": timing(response.timing),
        "model_version": response.model_version,
        "solved": solved(response.solved),
    }


def classify_result(response: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        np.asarray(response.labels, dtype=np.int64), decode(response.probabilities), **_common(response)
    )


def sample_result(response: pb.SampleResponse) -> SampleResult:
    return SampleResult(decode(response.points), decode(response.log_density), **_common(response))


def log_density_result(response: pb.LogDensityResponse) -> LogDensityResult:
    return LogDensityResult(decode(response.log_density), **_common(response))


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        message.name,
        message.version,
        message.kind,
        message.task,
        message.default_tol,
        message.device,
        json.loads(message.card_json or "{}"),
    )


def model_infos(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info(m) for m in response.models]
