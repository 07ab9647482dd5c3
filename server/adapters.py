"""How each kind of served model maps onto per-sample ODE solves.

An adapter turns a request's raw inputs into initial ODE states (with each row's time span),
names the dynamics and error norm the engine integrates, and turns end states into outputs.
The engine runs every item's ODE through the same batched, per-sample stepper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuralode.models import CNF, ODENet, standard_normal_log_prob
from neuralode.solvers import rms_norm
from neuralode.solvers.stepper import Norm

CLASSIFY, SAMPLE, LOG_DENSITY = "classify", "sample", "log_density"


@dataclass(frozen=True)
class Start:
    """Initial states for a batch of rows: y0 ``[k, *S]``, t0 and t_end ``[k]``."""

    y0: Tensor
    t0: Tensor
    t_end: Tensor


class Adapter:
    task: str
    kinds: tuple[str, ...]
    dynamics: Callable[[Tensor, Tensor], Tensor]
    norm: Norm = staticmethod(rms_norm)  # a plain function, not a method of the adapter

    def start(self, kind: str, inputs: Tensor, seeds: list[int]) -> Start:
        raise NotImplementedError

    def finish(self, kind: str, y1: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class ClassifierAdapter(Adapter):
    """ODE-Net: downsampling once per item, the ODE block per sample, then the head."""

    task = "classify"
    kinds = (CLASSIFY,)

    def __init__(self, model: ODENet) -> None:
        self.model = model
        self.dynamics = model.block.func

    def start(self, kind: str, images: Tensor, seeds: list[int]) -> Start:
        z0 = self.model.downsample(images)
        t0 = torch.zeros(len(images), dtype=z0.dtype, device=z0.device)
        return Start(z0, t0, torch.full_like(t0, self.model.block.t1))

    def finish(self, kind: str, z1: Tensor) -> dict[str, Tensor]:
        return {"probabilities": torch.softmax(self.model.head(z1), dim=1)}


class DensityAdapter(Adapter):
    """CNF: ``sample`` integrates [z, l] from the base at 0 to T, ``log_density`` from the
    data at T back to 0; rows of both kinds share one batch (each has its own time span)."""

    task = "density"
    kinds = (SAMPLE, LOG_DENSITY)

    def __init__(self, model: CNF) -> None:
        self.model = model
        self.dynamics = model.augmented
        self.norm = model.error_norm

    def start(self, kind: str, points: Tensor, seeds: list[int]) -> Start:
        k = len(points)
        generator = torch.Generator(device=points.device).manual_seed(seeds[0]) if self.model.trace == "hutchinson" else None
        if kind == SAMPLE:  # points are base draws z(0)
            y0 = self.model.initial_state(points, standard_normal_log_prob(points), generator)
            t0, t_end = 0.0, self.model.t1
        else:
            y0 = self.model.initial_state(points, torch.zeros_like(points[:, 0]), generator)
            t0, t_end = self.model.t1, 0.0
        t0_rows = torch.full((k,), t0, dtype=points.dtype, device=points.device)
        return Start(y0, t0_rows, torch.full_like(t0_rows, t_end))

    def finish(self, kind: str, y1: Tensor) -> dict[str, Tensor]:
        d = self.model.dim
        if kind == SAMPLE:
            return {"points": y1[:, :d], "log_density": y1[:, d]}
        return {"log_density": standard_normal_log_prob(y1[:, :d]) - y1[:, d]}


def adapter_for(model: nn.Module) -> Adapter:
    if isinstance(model, ODENet):
        return ClassifierAdapter(model)
    if isinstance(model, CNF):
        return DensityAdapter(model)
    raise TypeError(f"{type(model).__name__} is not a servable model (ODE-Net or CNF)")
