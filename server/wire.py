"""Translation between the wire messages and the engine's work items, with every check a
request must pass. Errors name the offending field; the servicer maps them to status codes."""

from __future__ import annotations

import math

import numpy as np
import torch

from neuralode.solvers import METHODS, Status
from odeserve.v1 import odeserve_pb2 as pb

from .adapters import CLASSIFY, LOG_DENSITY, SAMPLE
from .config import ServerConfig
from .engine import Scheduling
from .executor import Work
from .models import ServedModel

DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
SERVED_METHODS = tuple(sorted(name for name, method in METHODS.items() if method.adaptive))
DEFAULT_METHOD = "dopri5"


class InvalidArgument(ValueError):
    pass


class NotFound(LookupError):
    pass


# ---- tensors ---------------------------------------------------------------------------
def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    if tensor.dtype not in DTYPES:
        raise InvalidArgument(f"{field}.dtype must be one of {', '.join(DTYPES)}, got {tensor.dtype!r}")
    shape = list(tensor.shape)
    if any(n < 0 for n in shape):
        raise InvalidArgument(f"{field}.shape must not be negative, got {shape}")
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(tensor.data)} bytes, but shape {shape} of {tensor.dtype} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    name = next(name for name, dtype in DTYPES.items() if dtype == array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=name, shape=list(array.shape), data=array.astype(DTYPES[name], copy=False).tobytes())


# ---- models and accuracy ---------------------------------------------------------------------
def find_model(models: dict[str, ServedModel], name: str, version: str, task: str, rpc: str) -> ServedModel:
    if not name:
        raise InvalidArgument("model must name a served model (see ListModels)")
    model = models.get(name)  # a dictionary lookup: names never touch the file system
    if model is None:
        raise NotFound(f"model {name!r} is not served (see ListModels)")
    if version and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r} (serving {model.version})")
    if model.task != task:
        other = "Classify" if model.task == "classify" else "Sample or LogDensity"
        raise InvalidArgument(f"model {name!r} is a {model.task} model: {rpc} does not apply, use {other}")
    return model


def accuracy_settings(accuracy: pb.Accuracy, model: ServedModel, config: ServerConfig) -> tuple[float, float, str, int]:
    """(rtol, atol, method, max_nfe) for a request, with the model's and server's defaults.
    For ``auto_tol`` the tolerances are the model's default until the engine chooses."""
    if accuracy.auto_tol:
        return _auto_settings(accuracy, model, config)
    given = {name: getattr(accuracy, name) for name in ("tol", "rtol", "atol")}
    for name, value in given.items():
        if math.isnan(value) or math.isinf(value):
            raise InvalidArgument(f"accuracy.{name} must be a finite number, got {value}")
        if value < 0:
            raise InvalidArgument(f"accuracy.{name} must be > 0, got {value}")
    if given["tol"] and (given["rtol"] or given["atol"]):
        raise InvalidArgument("accuracy: give tol, or rtol and atol, not both")
    rtol = given["tol"] or given["rtol"] or model.default_tol
    atol = given["tol"] or given["atol"] or model.default_tol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not config.min_tol <= value <= config.max_tol:
            label = "tol" if given["tol"] else name
            raise InvalidArgument(
                f"accuracy.{label} must be between {config.min_tol:g} and {config.max_tol:g}, got {value:g}"
            )
    method = accuracy.method or DEFAULT_METHOD
    if method not in SERVED_METHODS:
        raise InvalidArgument(f"accuracy.method must be one of {', '.join(SERVED_METHODS)}, got {accuracy.method!r}")
    max_nfe = min(accuracy.max_nfe or config.max_nfe, config.max_nfe)
    return rtol, atol, method, max_nfe


def _auto_settings(accuracy: pb.Accuracy, model: ServedModel, config: ServerConfig) -> tuple[float, float, str, int]:
    if accuracy.tol or accuracy.rtol or accuracy.atol:
        raise InvalidArgument("accuracy: auto_tol chooses the tolerance; leave tol, rtol and atol unset")
    target = accuracy.latency_target_seconds
    if math.isnan(target) or math.isinf(target) or target < 0:
        raise InvalidArgument(f"accuracy.latency_target_seconds must be a finite number >= 0, got {target!r}")
    method = accuracy.method or DEFAULT_METHOD
    card_method = model.card.get("hyper", {}).get("method")
    if not auto_tolerances(model, config):
        raise InvalidArgument(f"accuracy.auto_tol: the card of model {model.name!r} has no NFE table within the "
                              f"served tolerances [{config.min_tol:g}, {config.max_tol:g}]")  # fmt: skip
    if method != card_method:
        raise InvalidArgument(f"accuracy.auto_tol needs the method the model card was measured with ({card_method}), "
                              f"got {method!r}")  # fmt: skip
    max_nfe = min(accuracy.max_nfe or config.max_nfe, config.max_nfe)
    return model.default_tol, model.default_tol, method, max_nfe


def auto_tolerances(model: ServedModel, config: ServerConfig) -> list[float]:
    """The card's evaluated tolerances that requests may be served at, for ``auto_tol``."""
    return [tol for tol in model.card_tolerances if config.min_tol <= tol <= config.max_tol]


def scheduling_settings(accuracy: pb.Accuracy, scheduling: pb.Scheduling, deadline: float | None,
                        config: ServerConfig) -> Scheduling:  # fmt: skip
    """The engine's scheduling for a request: priority level, NFE budget, auto tolerance."""
    priority = scheduling.priority or config.default_priority
    if priority > config.priority_levels:
        raise InvalidArgument(f"scheduling.priority must be 0 (the default, {config.default_priority}) or 1 .. "
                              f"{config.priority_levels}, got {scheduling.priority}")  # fmt: skip
    budget = min(scheduling.max_total_nfe or config.max_request_nfe, config.max_request_nfe)
    target = accuracy.latency_target_seconds or None
    if accuracy.auto_tol and target is None and deadline is None:
        raise InvalidArgument("accuracy.auto_tol needs latency_target_seconds or a deadline on the call")
    return Scheduling(priority=priority, budget=budget, auto=accuracy.auto_tol, latency_target=target)


def _count(n: int, field: str, config: ServerConfig) -> None:
    if n < 1:
        raise InvalidArgument(f"{field} must hold at least one item")
    if n > config.max_items_per_request:
        raise InvalidArgument(f"{field} holds {n} items; the limit per request is {config.max_items_per_request}")


def _finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.argwhere(~np.isfinite(array.reshape(len(array), -1)))[0][0])
        raise InvalidArgument(f"{field} contains NaN or Inf (item {bad})")


# ---- requests -> work -----------------------------------------------------------------------------
def classify_work(request: pb.ClassifyRequest, model: ServedModel, config: ServerConfig) -> list[Work]:
    images = decode_tensor(request.images, "images")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise InvalidArgument(f"images must have shape [N, 28, 28] or [N, 1, 28, 28], got {list(request.images.shape)}")
    _count(images.shape[0], "images", config)
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32) / 255.0
    else:
        _finite(images, "images")
        if images.min() < 0 or images.max() > 1:
            raise InvalidArgument("images: float pixels must lie in [0, 1] (or send uint8 0..255)")
        pixels = images.astype(np.float32)
    rtol, atol, method, max_nfe = accuracy_settings(request.accuracy, model, config)
    tensor = torch.from_numpy(pixels[:, None].copy())
    return [Work(CLASSIFY, row, rtol, atol, method, max_nfe) for row in tensor]


def sample_work(request: pb.SampleRequest, model: ServedModel, config: ServerConfig) -> list[Work]:
    _count(request.n, "n", config)
    rtol, atol, method, max_nfe = accuracy_settings(request.accuracy, model, config)
    dim = model.card["hyper"].get("dim", 2)
    # Base draws come from the seed alone, on the CPU: the same seed gives the same points on any device.
    generator = torch.Generator().manual_seed(int(request.seed))
    base = torch.randn(request.n, dim, generator=generator)
    return [Work(SAMPLE, row, rtol, atol, method, max_nfe, seed=int(request.seed)) for row in base]


def log_density_work(request: pb.LogDensityRequest, model: ServedModel, config: ServerConfig) -> list[Work]:
    points = decode_tensor(request.points, "points")
    dim = model.card["hyper"].get("dim", 2)
    if points.dtype == np.uint8:
        raise InvalidArgument("points.dtype must be float32 or float64")
    if points.ndim != 2 or points.shape[1] != dim:
        raise InvalidArgument(f"points must have shape [N, {dim}], got {list(request.points.shape)}")
    _count(points.shape[0], "points", config)
    _finite(points, "points")
    points = points.astype(np.float32)  # what the model computes in
    if not np.isfinite(points).all():
        bad = int(np.argwhere(~np.isfinite(points))[0][0])
        raise InvalidArgument(f"points: item {bad} is beyond float32's range (about ±3.4e38), which the model computes in")
    if np.abs(points).max() > config.max_abs_input:
        bad = int(np.argwhere(np.abs(points) > config.max_abs_input)[0][0])
        raise InvalidArgument(f"points: coordinates must lie within ±{config.max_abs_input:g} (item {bad})")
    rtol, atol, method, max_nfe = accuracy_settings(request.accuracy, model, config)
    tensor = torch.from_numpy(points)
    return [Work(LOG_DENSITY, row, rtol, atol, method, max_nfe) for row in tensor]


# ---- results -> responses ---------------------------------------------------------------------
def solved(rtol: float, atol: float, method: str, preemptions: int) -> pb.Solved:
    return pb.Solved(rtol=rtol, atol=atol, method=method, preemptions=preemptions)


def item_stats(nfe: list[int], statuses: list[Status]) -> pb.ItemStats:
    return pb.ItemStats(nfe=nfe, status=[int(s) for s in statuses])


def model_info(model: ServedModel) -> pb.ModelInfo:
    import json

    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        kind=model.kind,
        task=model.task,
        card_json=json.dumps(model.card, sort_keys=True),
        default_tol=model.default_tol,
        device=model.device,
    )
