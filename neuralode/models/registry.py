"""Model kinds by name: one :class:`ModelSpec` per kind says how a checkpoint's card rebuilds
its model and what training, evaluation and the server need to know about it.

Training, evaluation and the server ask the spec (``model_spec(kind).has_ode``), never compare
kind names; the server knows a model only through the servable-model protocol
(:mod:`neuralode.models.servable`). A new kind for an existing task is its model and one
:func:`register` call (docs/server.md, "Adding a model kind").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .cnf import CNF, ConcatSquashMLP, PlanarDynamics, PlanarFlow
from .odenet import MLP, ODENet, ResNet
from .servable import CLASSIFY, DENSITY


@dataclass(frozen=True)
class ModelSpec:
    """What the project knows about a model kind.

    Arguments:
        kind: the name in model cards and on the training command line.
        task: what it answers: ``"classify"`` (MNIST images to 10 classes) or ``"density"``.
        build: the constructor, called with the card's ``hyper`` as keyword arguments.
        has_ode: its forward is an ODE solve: its ``hyper`` carries solver settings (``method``,
            ``tol``, ``first_step``), it is evaluated per tolerance, trained with the ODE
            regularisers, can be tuned, and (implementing the servable-model protocol) served.
        adjoint: trained with the adjoint method unless told otherwise; False: never (no ODE,
            or backpropagation through the solver, as RK-Net).
        hyper: architecture hyper-parameters training starts from (solver settings are added
            for kinds with an ODE).
        description: one line, the training command's help.
    """

    kind: str
    task: str
    build: Callable[..., nn.Module]
    has_ode: bool
    adjoint: bool = False
    hyper: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.task not in (CLASSIFY, DENSITY):
            raise ValueError(f"model kind {self.kind!r}: task must be {CLASSIFY!r} or {DENSITY!r}, got {self.task!r}")
        if self.adjoint and not self.has_ode:
            raise ValueError(f"model kind {self.kind!r}: a model without an ODE has no adjoint to train with")


def _cnf(
    dim: int = 2, dynamics: str = "concatsquash", hidden: list[int] | None = None, width: int = 32, **options
) -> CNF:
    if dynamics == "concatsquash":
        net: nn.Module = ConcatSquashMLP(dim, tuple(hidden or (64, 64, 64)))
    elif dynamics == "planar":
        net = PlanarDynamics(dim, width)
    else:
        raise ValueError(f"unknown CNF dynamics {dynamics!r}: concatsquash or planar")
    return CNF(net, dim, **options)


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Make ``spec.kind`` known to checkpoints, training, evaluation and the server."""
    if spec.kind in _SPECS and not replace:
        raise ValueError(f"model kind {spec.kind!r} is already registered")
    _SPECS[spec.kind] = spec
    return spec


def unregister(kind: str) -> None:
    """Forget a registered kind (for tests that register one of their own)."""
    model_spec(kind)
    del _SPECS[kind]


for _spec in (
    ModelSpec(
        "odenet",
        CLASSIFY,
        lambda **h: ODENet(**h),
        has_ode=True,
        adjoint=True,
        hyper={"channels": 64},
        description="ODE-Net on MNIST, trained with the adjoint method",
    ),
    ModelSpec(
        "rknet",
        CLASSIFY,
        lambda **h: ODENet(**h, adjoint=False),
        has_ode=True,
        hyper={"channels": 64},
        description="RK-Net: ODE-Net trained by backpropagating through the solver",
    ),
    ModelSpec(
        "resnet",
        CLASSIFY,
        lambda **h: ResNet(**h),
        has_ode=False,
        description="ResNet baseline on MNIST (same downsampling, 6 residual blocks)",
    ),
    ModelSpec("mlp", CLASSIFY, lambda **h: MLP(**h), has_ode=False, description="1-layer MLP baseline on MNIST"),
    ModelSpec(
        "cnf",
        DENSITY,
        _cnf,
        has_ode=True,
        adjoint=True,
        description="continuous normalizing flow on a 2-D toy density or energy target",
    ),
    ModelSpec(
        "planar-nf",
        DENSITY,
        lambda **h: PlanarFlow(**h),
        has_ode=False,
        description="discrete planar normalizing flow (K layers) on an energy target",
    ),
):
    register(_spec)


def specs() -> list[ModelSpec]:
    """Every registered kind's spec, in the order they were registered."""
    return list(_SPECS.values())


def kinds(*, task: str | None = None, has_ode: bool | None = None) -> list[str]:
    """The registered kinds, sorted; only those of ``task`` and with(out) an ODE when given."""
    return sorted(
        spec.kind
        for spec in _SPECS.values()
        if (task is None or spec.task == task) and (has_ode is None or spec.has_ode == has_ode)
    )


def model_spec(kind: str) -> ModelSpec:
    """The spec of ``kind``; a ``ValueError`` naming the known kinds if there is none."""
    spec = _SPECS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(kinds())}")
    return spec


def build_model(kind: str, hyper: dict[str, Any]) -> nn.Module:
    spec = model_spec(kind)
    if not isinstance(hyper, dict):
        raise TypeError("hyper must be a dict of constructor arguments")
    return spec.build(**hyper)
