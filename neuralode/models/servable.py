"""The servable-model protocol: what a server needs of a model whose answers are ODE solves.

A served item is one per-sample solve. The model says which operations it answers and their
inputs and outputs (:meth:`ServableModel.signatures`); turns a request's checked inputs into one
row per item (:meth:`~ServableModel.initial_rows`, on the CPU, drawing any randomness from the
request's generator); turns a batch of rows, on the device, into the ODE's initial state and
span (:meth:`~ServableModel.encode`); gives the dynamics (:meth:`~ServableModel.ode_dynamics`),
the error norm and the first step its solves take; and turns end states back into outputs
(:meth:`~ServableModel.decode`). The server then runs every item's ODE through one stepper,
batching rows of any request together, and never reads a model's layers.

``encode``, ``ode_dynamics`` and ``decode`` must treat rows independently (a row's result may
not depend on what it is batched with), as per-sample solving requires.

Operations are named by the server's work kinds: ``"classify"`` (task ``"classify"``),
``"sample"`` and ``"log_density"`` (task ``"density"``). No gRPC, no server types here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

CLASSIFY, DENSITY = "classify", "density"
"""The tasks: what a model's operations answer."""

TASK_OF = {"classify": CLASSIFY, "sample": DENSITY, "log_density": DENSITY}
"""Each operation's task."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of an operation: its name, accepted dtypes (the first is the one
    produced or preferred), shape (-1: any length; () a scalar), what it means, and whether a
    request may leave it out (``optional``: the model then uses its default)."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    description: str
    optional: bool = False


@dataclass(frozen=True)
class Signature:
    """One operation of a model, with its inputs and outputs."""

    operation: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Start:
    """Initial states for a batch of rows: y0 ``[k, *S]``, t0 and t_end ``[k]``."""

    y0: Tensor
    t0: Tensor
    t_end: Tensor


@runtime_checkable
class ServableModel(Protocol):
    """A model the server can serve: implemented by :class:`~neuralode.models.ODENet` (and so
    RK-Net) and :class:`~neuralode.models.CNF`. Models without an ODE (ResNet, MLP, the planar
    flow) do not implement it and are not served."""

    @property
    def first_step(self) -> float | None:
        """The step each adaptive solve tries first; None: Hairer's rule."""
        ...

    def signatures(self) -> tuple[Signature, ...]:
        """The operations this model answers, in the order a client lists them."""
        ...

    def initial_rows(self, operation: str, inputs: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        """One row per item, float32 on the CPU, from inputs already checked against the
        signature (tensors by name; scalars as ints). Random draws (base samples, noise) come
        from ``generator``, seeded by the request."""
        ...

    def encode(self, operation: str, rows: Tensor) -> Start:
        """A batch of rows (on the model's device) as the ODE's initial state and span."""
        ...

    def ode_dynamics(self, t: Tensor, y: Tensor) -> Tensor:
        """dy/dt per row; ``t`` holds one time per row."""
        ...

    def decode(self, operation: str, y1: Tensor) -> dict[str, Tensor]:
        """Per-row outputs from end states (named as the signature's outputs, or the ones the
        server derives from them, as labels from probabilities)."""
        ...

    def error_norm(self, scaled: Tensor) -> Tensor:
        """The per-row norm of the scaled error estimate that step-size control uses."""
        ...

    def state_size(self, operation: str) -> int:
        """Elements of one row's ODE state, for the server's memory budget."""
        ...

    def encode_bytes(self, operation: str) -> int:
        """The most activation memory encoding one row holds at once (its widest intermediate),
        so the server can encode in cache-sized chunks on the CPU; 0: encoding is cheap."""
        ...
