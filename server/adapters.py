"""How a served model maps onto per-sample ODE solves.

An adapter owns what the engine needs of a model for a request: the inputs and outputs of
each kind it answers (its signatures, which model metadata publishes), checking a request's
arrays against them, preparing one initial row per item (drawing base samples and noise from
the request's seed), turning a batch of rows into initial ODE states on the device, and turning
end states into outputs. The engine runs every item's ODE through the same per-sample stepper.

The server knows a model only through the servable-model protocol
(:class:`neuralode.models.ServableModel`): :class:`ServableAdapter` serves any model that
implements it. What is checked here is each kind's wire contract (images, points, counts), the
same for every model of a task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from neuralode.models import ServableModel, Start
from neuralode.models import Signature as ModelSignature
from neuralode.solvers import Norm, rms_norm

from .api import Kind, Signature, Task, TensorSpec, invalid

__all__ = ["CPU_CHUNK_BYTES", "Adapter", "Limits", "ServableAdapter", "Start", "adapter_for"]

CPU_CHUNK_BYTES = 4 << 20
"""On the CPU, the most activation memory one chunk of the downsampling may hold: a batch of
256 images has 44 MB feature maps, which miss the cache and, from glibc, come as fresh pages
to fault in; chunks of 4 MB (24 images) run the same arithmetic about 3 times faster per image
(docs/server.md, "The model outside the ODE")."""


@dataclass(frozen=True)
class Limits:
    """The server's bounds on a request's inputs."""

    max_items: int
    max_abs_input: float


class Adapter:
    task: Task
    signatures: dict[Kind, Signature]
    dynamics: Callable[[Tensor, Tensor], Tensor]
    norm: Norm = staticmethod(rms_norm)  # a plain function, not a method of the adapter
    first_step: float | None = None  # the model's first step for adaptive methods; None: Hairer's rule

    def prepare(self, kind: Kind, inputs: Mapping[str, np.ndarray], limits: Limits) -> Tensor:
        """One row per item (``[N, ...]``, float32 on the CPU), after checking the inputs;
        raises :class:`server.api.RequestError` naming the field."""
        raise NotImplementedError

    def start(self, kind: Kind, rows: Tensor) -> Start:
        raise NotImplementedError

    def finish(self, kind: Kind, y1: Tensor) -> dict[str, Tensor]:
        """Per-row outputs from end states."""
        raise NotImplementedError

    def present(self, kind: Kind, outputs: dict[str, np.ndarray], succeeded: np.ndarray) -> dict[str, np.ndarray]:
        """A request's outputs as the signature names them (NaN where an item failed)."""
        return {name: values.astype(np.float32) for name, values in outputs.items()}

    def state_bytes(self, kind: Kind) -> int:
        """Bytes of solver state one item holds while it runs or is parked (y and the FSAL
        stage), for the server's memory budget."""
        raise NotImplementedError

    def warmup_inputs(self, kind: Kind, n: int) -> dict[str, np.ndarray]:
        """A valid request of ``n`` items of ``kind``, as a wire protocol decodes one (blank
        images, points at the origin, ``n`` draws), for warm-up solves before serving: the
        same checks and rows as a client's request, with nothing of a client's in it."""
        return {
            spec.name: _WARMUP_INPUTS[spec.name](spec, n) for spec in self.signatures[kind].inputs if not spec.optional
        }


def _count(n: int, field: str, limits: Limits) -> None:
    if n < 1:
        raise invalid(f"{field} must hold at least one item")
    if n > limits.max_items:
        raise invalid(f"{field} holds {n} items; the limit per request is {limits.max_items}")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argwhere(mask.reshape(len(mask), -1).any(1))[0][0])


def _finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(f"{field} contains NaN or Inf (item {_first_bad(~np.isfinite(array))})")


def _images(spec: TensorSpec, images: np.ndarray, limits: Limits) -> Tensor:
    """Images ``[N, H, W]`` (``[N, 1, H, W]`` too), uint8 0..255 or float in [0, 1], as float32
    pixels in [0, 1]."""
    side = spec.shape[1:]
    original = images.shape
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != side:
        raise invalid(
            f"images must have shape [N, {side[0]}, {side[1]}] or [N, 1, {side[0]}, {side[1]}], got {list(original)}"
        )
    _count(images.shape[0], "images", limits)
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32) / 255.0
    elif images.dtype.kind == "f":
        _finite(images, "images")
        if images.min() < 0 or images.max() > 1:
            raise invalid("images: float pixels must lie in [0, 1] (or send uint8 0..255)")
        pixels = images.astype(np.float32)
    else:
        raise invalid(f"images.dtype must be uint8 or float32, got {images.dtype}")
    return torch.from_numpy(pixels)


def _points(spec: TensorSpec, points: np.ndarray, limits: Limits) -> Tensor:
    """Points ``[N, d]``, finite in float32 and within the server's bound, as float32."""
    d = spec.shape[1]
    if points.dtype.kind != "f":
        raise invalid("points.dtype must be float32 or float64")
    if points.ndim != 2 or points.shape[1] != d:
        raise invalid(f"points must have shape [N, {d}], got {list(points.shape)}")
    _count(points.shape[0], "points", limits)
    _finite(points, "points")
    as_float32 = points.astype(np.float32)  # what the model computes in
    if not np.isfinite(as_float32).all():
        bad = _first_bad(~np.isfinite(as_float32))
        raise invalid(f"points: item {bad} is beyond float32's range (about ±3.4e38), which the model computes in")
    if np.abs(as_float32).max() > limits.max_abs_input:
        bad = _first_bad(np.abs(as_float32) > limits.max_abs_input)
        raise invalid(f"points: coordinates must lie within ±{limits.max_abs_input:g} (item {bad})")
    return torch.from_numpy(as_float32)


def _n(spec: TensorSpec, n: np.ndarray, limits: Limits) -> int:
    _count(int(n), "n", limits)
    return int(n)


def _seed(spec: TensorSpec, seed: np.ndarray, limits: Limits) -> int:
    return int(seed)


_INPUT_CHECKS: dict[str, Callable[[TensorSpec, np.ndarray, Limits], Tensor | int]] = {
    "images": _images,
    "points": _points,
    "n": _n,
    "seed": _seed,
}
"""The wire contract of each input the RPCs carry (``odeserve.v1`` and Open Inference name
them alike): how it is checked and handed to the model. A model's inputs must be among them."""

_WARMUP_INPUTS: dict[str, Callable[[TensorSpec, int], np.ndarray]] = {
    "images": lambda spec, n: np.zeros((n, *spec.shape[1:]), np.uint8),
    "points": lambda spec, n: np.zeros((n, *spec.shape[1:]), np.float32),
    "n": lambda spec, n: np.asarray(n, np.uint32),
    "seed": lambda spec, n: np.asarray(0, np.uint64),
}
"""Per input of :data:`_INPUT_CHECKS`, a valid value for ``n`` items (:meth:`Adapter.warmup_inputs`)."""


class ServableAdapter(Adapter):
    """Any model implementing :class:`neuralode.models.ServableModel`: its signatures, with
    each input checked by its wire contract; rows, encoding, dynamics, norm, first step and
    decoding are the model's own. On the CPU, encoding runs in chunks of at most
    ``CPU_CHUNK_BYTES`` of activations."""

    def __init__(self, model: ServableModel) -> None:
        self.model = model
        self.dynamics = model.ode_dynamics
        self.norm = model.error_norm
        self.first_step = model.first_step
        self.signatures = {}
        for signature in model.signatures():
            kind = _kind_of(model, signature)
            self.signatures[kind] = Signature(kind, _specs(signature.inputs), _specs(signature.outputs))
        tasks = {kind.task for kind in self.signatures}
        if len(tasks) != 1:
            raise TypeError(f"{type(model).__name__} must answer the operations of one task, not {len(tasks)}")
        self.task: Task = tasks.pop()
        parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        itemsize, cpu = (4, True) if parameter is None else (parameter.element_size(), parameter.device.type == "cpu")
        self._state_bytes = {kind: 2 * model.state_size(kind.value) * itemsize for kind in self.signatures}
        self._chunk_rows = {
            kind: max(1, CPU_CHUNK_BYTES // widest) if cpu and widest else None
            for kind, widest in ((k, model.encode_bytes(k.value)) for k in self.signatures)
        }

    def prepare(self, kind: Kind, inputs: Mapping[str, np.ndarray], limits: Limits) -> Tensor:
        checked = {
            spec.name: _INPUT_CHECKS[spec.name](spec, inputs[spec.name], limits)
            for spec in self.signatures[kind].inputs
            if spec.name in inputs
        }
        generator = torch.Generator().manual_seed(int(checked.get("seed", 0)))
        return self.model.initial_rows(kind.value, checked, generator)

    def start(self, kind: Kind, rows: Tensor) -> Start:
        chunk = self._chunk_rows[kind]
        if chunk is None or len(rows) <= chunk:
            return self.model.encode(kind.value, rows)
        parts = [self.model.encode(kind.value, part) for part in rows.split(chunk)]
        return Start(*(torch.cat(tensors) for tensors in zip(*((p.y0, p.t0, p.t_end) for p in parts))))

    def finish(self, kind: Kind, y1: Tensor) -> dict[str, Tensor]:
        return self.model.decode(kind.value, y1)

    def present(self, kind: Kind, outputs: dict[str, np.ndarray], succeeded: np.ndarray) -> dict[str, np.ndarray]:
        presented = super().present(kind, outputs, succeeded)
        if kind is Kind.CLASSIFY:  # Classify's contract: the most probable class, -1 where the solve failed
            presented["labels"] = np.where(succeeded, presented["probabilities"].argmax(1), -1).astype(np.int32)
        return presented

    def state_bytes(self, kind: Kind) -> int:
        return self._state_bytes[kind]


def _kind_of(model: ServableModel, signature: ModelSignature) -> Kind:
    try:
        kind = Kind(signature.operation)
    except ValueError:
        raise TypeError(
            f"{type(model).__name__} answers {signature.operation!r}, which no RPC asks for "
            f"(the server's kinds: {', '.join(k.value for k in Kind)})"
        ) from None
    unchecked = [spec.name for spec in signature.inputs if spec.name not in _INPUT_CHECKS]
    if unchecked:
        raise TypeError(
            f"{type(model).__name__}: input {unchecked[0]!r} of {kind.value} is not one the server checks "
            f"({', '.join(_INPUT_CHECKS)})"
        )
    return kind


def _specs(specs) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, s.dtypes, s.shape, s.description, s.optional) for s in specs)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter serving ``model``: any model implementing the servable-model protocol."""
    if not isinstance(model, ServableModel):
        raise TypeError(
            f"{type(model).__name__} is not a servable model: it does not implement "
            "neuralode.models.ServableModel (models without an ODE are not served)"
        )
    return ServableAdapter(model)
