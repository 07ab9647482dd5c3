"""How each kind of served model maps onto per-sample ODE solves.

An adapter owns everything model-specific about a request: the inputs and outputs of each
kind it answers (its signatures, which model metadata publishes), checking a request's arrays
against them, preparing one initial row per item (drawing base samples and noise from the
request's seed), turning a batch of rows into initial ODE states on the device, and turning
end states into outputs. The engine runs every item's ODE through the same per-sample stepper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from neuralode.models import CNF, ODENet, standard_normal_log_prob
from neuralode.solvers import rms_norm
from neuralode.solvers.stepper import Norm

from .api import Kind, Signature, Task, TensorSpec, invalid

IMAGE_SIDE = 28
CPU_CHUNK_BYTES = 4 << 20
"""On the CPU, the most activation memory one chunk of the downsampling may hold: a batch of
256 images has 44 MB feature maps, which miss the cache and, from glibc, come as fresh pages
to fault in; chunks of 4 MB (24 images) run the same arithmetic about 3 times faster per image
(docs/server.md, "The model outside the ODE")."""


@dataclass(frozen=True)
class Start:
    """Initial states for a batch of rows: y0 ``[k, *S]``, t0 and t_end ``[k]``."""

    y0: Tensor
    t0: Tensor
    t_end: Tensor


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


IMAGES = TensorSpec("images", ("uint8", "float32"), (-1, IMAGE_SIDE, IMAGE_SIDE),
                    "MNIST-shaped images: uint8 0..255, or float32 in [0, 1]; [N, 1, 28, 28] is accepted too")  # fmt: skip


class ClassifierAdapter(Adapter):
    """ODE-Net: downsampling once per item, the ODE block per sample, then the head."""

    task = Task.CLASSIFY

    def __init__(self, model: ODENet) -> None:
        self.model = model
        self.dynamics = model.block.func
        self.first_step = model.block.first_step
        parameter = next(model.parameters())
        probe, widest = torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE, dtype=parameter.dtype, device=parameter.device), 0
        with torch.no_grad():
            for layer in model.downsample:
                probe = layer(probe)
                widest = max(widest, probe.numel() * probe.element_size())
            classes = model.head(probe).shape[1]
        self._state_bytes = 2 * probe.numel() * probe.element_size()
        self._chunk_rows = max(1, CPU_CHUNK_BYTES // widest) if parameter.device.type == "cpu" else None
        self.signatures = {Kind.CLASSIFY: Signature(Kind.CLASSIFY, (IMAGES,), (
            TensorSpec("probabilities", ("float32",), (-1, classes), "class probabilities; NaN where the item's solve failed"),
            TensorSpec("labels", ("int32",), (-1,), "the most probable class; -1 where the item's solve failed"),
        ))}  # fmt: skip

    def prepare(self, kind: Kind, inputs: Mapping[str, np.ndarray], limits: Limits) -> Tensor:
        images = inputs["images"]
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise invalid(f"images must have shape [N, 28, 28] or [N, 1, 28, 28], got {list(inputs['images'].shape)}")
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
        return torch.from_numpy(pixels[:, None].copy())

    def start(self, kind: Kind, images: Tensor) -> Start:
        if self._chunk_rows is None or len(images) <= self._chunk_rows:
            z0 = self.model.downsample(images)
        else:
            z0 = torch.cat([self.model.downsample(chunk) for chunk in images.split(self._chunk_rows)])
        t0 = torch.zeros(len(images), dtype=z0.dtype, device=z0.device)
        return Start(z0, t0, torch.full_like(t0, self.model.block.t1))

    def finish(self, kind: Kind, z1: Tensor) -> dict[str, Tensor]:
        return {"probabilities": torch.softmax(self.model.head(z1), dim=1)}

    def present(self, kind: Kind, outputs: dict[str, np.ndarray], succeeded: np.ndarray) -> dict[str, np.ndarray]:
        probabilities = outputs["probabilities"].astype(np.float32)
        labels = np.where(succeeded, probabilities.argmax(1), -1).astype(np.int32)
        return {"probabilities": probabilities, "labels": labels}

    def state_bytes(self, kind: Kind) -> int:
        return self._state_bytes


class DensityAdapter(Adapter):
    """CNF: ``sample`` integrates [z, l] from the base at 0 to T, ``log_density`` from the
    data at T back to 0; rows of both kinds share one batch (each has its own time span).

    A request's base draws and Hutchinson noise come from its seed, drawn for the whole
    request on the CPU: the same request gives the same rows on any device, in any batch."""

    task = Task.DENSITY

    def __init__(self, model: CNF) -> None:
        self.model = model
        self.dynamics = model.augmented
        self.norm = model.error_norm
        self.first_step = model.first_step
        d = model.dim
        points = ("float32",), (-1, d)
        self.signatures = {
            Kind.SAMPLE: Signature(Kind.SAMPLE, (
                TensorSpec("n", ("uint32",), (), "how many points to draw"),
                TensorSpec("seed", ("uint64",), (), "the base draws' seed: the same seed gives the same points"),
            ), (
                TensorSpec("points", *points, "samples; NaN where the item's solve failed"),
                TensorSpec("log_density", ("float32",), (-1,), "log p of each sample"),
            )),
            Kind.LOG_DENSITY: Signature(Kind.LOG_DENSITY, (
                TensorSpec("points", ("float32", "float64"), (-1, d), "points to evaluate; finite in float32"),
            ), (
                TensorSpec("log_density", ("float32",), (-1,), "exact log p of each point; NaN where the solve failed"),
            )),
        }  # fmt: skip

    def prepare(self, kind: Kind, inputs: Mapping[str, np.ndarray], limits: Limits) -> Tensor:
        d = self.model.dim
        if kind is Kind.SAMPLE:
            n, seed = int(inputs["n"]), int(inputs.get("seed", np.uint64(0)))
            _count(n, "n", limits)
            generator = torch.Generator().manual_seed(seed)
            z0 = torch.randn(n, d, generator=generator)
            return self.model.initial_state(z0, standard_normal_log_prob(z0), generator)
        points = inputs["points"]
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
        x = torch.from_numpy(as_float32)
        generator = torch.Generator().manual_seed(0)
        return self.model.initial_state(x, torch.zeros_like(x[:, 0]), generator)

    def start(self, kind: Kind, rows: Tensor) -> Start:
        t0, t_end = (0.0, self.model.t1) if kind is Kind.SAMPLE else (self.model.t1, 0.0)
        t0_rows = torch.full((len(rows),), t0, dtype=rows.dtype, device=rows.device)
        return Start(rows, t0_rows, torch.full_like(t0_rows, t_end))

    def finish(self, kind: Kind, y1: Tensor) -> dict[str, Tensor]:
        d = self.model.dim
        if kind is Kind.SAMPLE:
            return {"points": y1[:, :d], "log_density": y1[:, d]}
        return {"log_density": standard_normal_log_prob(y1[:, :d]) - y1[:, d]}

    def state_bytes(self, kind: Kind) -> int:
        width = self.model.dim + 1 + (self.model.dim if self.model.trace == "hutchinson" else 0)
        return 2 * width * 4


def adapter_for(model: nn.Module) -> Adapter:
    if isinstance(model, ODENet):
        return ClassifierAdapter(model)
    if isinstance(model, CNF):
        return DensityAdapter(model)
    raise TypeError(f"{type(model).__name__} is not a servable model (ODE-Net or CNF)")
