"""The per-call accuracy settings that every model's solving method takes, defined once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from torch import Tensor

from .methods import SCIPY_METHOD, get_method
from .problem import Tolerance
from .solver import Solver


class Accuracy(TypedDict, total=False):
    """Keyword arguments a call may override (``None`` or absent: the model's own setting):
    ``rtol``/``atol`` (floats or ``[B]`` tensors), ``method``, a ``max_nfe`` budget and the
    ``precision`` f is evaluated in (``"float32"``, ``"bfloat16"``; :mod:`neuralode.precision`)."""

    rtol: Tolerance | None
    atol: Tolerance | None
    method: str | None
    max_nfe: int | Tensor | None
    precision: str | None


def solve_settings(
    accuracy: Accuracy, *, rtol: Tolerance, atol: Tolerance, method: str, first_step: float | None = None
) -> dict:
    """``solve_ivp`` keyword arguments: the call's ``accuracy`` over the model's defaults.

    The model's ``first_step`` goes only to methods with step-size control: a call may ask
    for a fixed-step method, which has no first step to try."""
    unknown = set(accuracy) - set(Accuracy.__annotations__)
    if unknown:
        raise TypeError(f"unexpected accuracy settings {sorted(unknown)}; known are {sorted(Accuracy.__annotations__)}")
    defaults = {"rtol": rtol, "atol": atol, "method": method, "max_nfe": None, "precision": None}
    given: Mapping[str, Any] = accuracy  # looked up by the defaults' names
    settings: dict[str, Any] = {
        key: default if given.get(key) is None else given[key] for key, default in defaults.items()
    }
    settings["first_step"] = first_step if first_step is not None and takes_first_step(settings["method"]) else None
    return settings


def takes_first_step(method: str | Solver) -> bool:
    """Whether ``method`` controls its step size, so that a first step can be given to it."""
    solver = get_method(method) if isinstance(method, str) and method != SCIPY_METHOD else method
    return isinstance(solver, Solver) and solver.adaptive
