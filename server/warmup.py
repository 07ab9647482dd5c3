"""Warm-up: before a model version takes traffic, it solves one request of each kind it answers,
in each precision it serves, at each batch size the engine runs it at, through the request path's
own pieces (the adapter's checks and rows, the worker's scheduler and executor on the device).

Whatever a first request of a shape pays once — allocating and faulting in its tensors, oneDNN
or cuDNN choosing kernels for the shape, a CUDA graph's capture per padded batch size — is paid
here instead, in the executor the requests will use. The solves are nobody's traffic: the engine
reports none of their steps or items, and no request metric sees them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from neuralode.solvers import Status

from .adapters import Limits
from .api import Kind
from .config import ServerConfig
from .engine import Engine
from .executor import Work
from .models import ServedModel
from .validation import DEFAULT_METHOD, served_precisions


class WarmUpFailed(Exception):
    """A warm-up solve raised (the model's worker crashed, say) or gave non-finite results: the
    version is not served, as a checkpoint that does not load is not."""


@dataclass(frozen=True)
class Solve:
    """One warm-up request: ``items`` items of ``kind`` with f in ``precision``."""

    kind: Kind
    precision: str
    items: int

    def __str__(self) -> str:
        return f"{self.kind.value} in {self.precision} at {self.items} items"


@dataclass(frozen=True)
class WarmUp:
    seconds: float
    solves: tuple[Solve, ...]
    limited: tuple[str, ...]  # solves a limit (max_nfe, ...) stopped: warmed, but worth a look


def batch_sizes(max_batch: int, padded: bool) -> tuple[int, ...]:
    """The batch sizes warmed. With step graphs or compiled dynamics (``padded``), each padded
    size (a power of two) is a CUDA graph or a compiled f of its own, made on first use: every
    one up to ``max_batch``'s. Eager, shapes have no buckets (a batch's size changes step by
    step as items finish): the smallest and the largest batch, whose allocations the ones
    between reuse."""
    if padded:
        return tuple(sorted({min(1 << k, max_batch) for k in range(max_batch.bit_length() + 1)}))
    return tuple(sorted({1, max_batch}))


def plan(model: ServedModel, config: ServerConfig) -> tuple[Solve, ...]:
    """Every kind the model answers × every precision it serves × :func:`batch_sizes`."""
    sizes = batch_sizes(config.max_batch, "on" in (config.step_graphs, config.compile_dynamics))
    return tuple(
        Solve(kind, precision, items)
        for kind in model.adapter.signatures
        for precision in served_precisions(model, config)
        for items in sizes
    )


def warm_up(engine: Engine, model: ServedModel, config: ServerConfig) -> WarmUp:
    """Run :func:`plan` on ``model``'s worker (already added to ``engine``, not yet served), at
    the model's default tolerance with the default method; raises :class:`WarmUpFailed`."""
    solves, tol = plan(model, config), model.default_tol
    begin = time.perf_counter()
    try:
        requests = []
        for solve in solves:
            inputs = model.adapter.warmup_inputs(solve.kind, solve.items)
            rows = model.adapter.prepare(solve.kind, inputs, Limits(solve.items, config.max_abs_input))
            works = [Work(solve.kind, row, tol, tol, DEFAULT_METHOD, config.max_nfe, solve.precision) for row in rows]
            requests.append(works)
        results = engine.warm_up(model.key, requests)
    except Exception as error:  # noqa: BLE001 - any failure keeps the version from serving
        raise WarmUpFailed(f"{type(error).__name__}: {str(error)[:200]}") from error
    seconds = time.perf_counter() - begin
    limited = []
    for solve, result in zip(solves, results):
        ended = sorted({status for status in result.statuses if status != Status.SUCCESS})
        if Status.NON_FINITE in ended:
            raise WarmUpFailed(f"{solve}: {Status.NON_FINITE.message}")
        limited += [f"{solve}: {status.name}" for status in ended]
    return WarmUp(seconds, solves, tuple(limited))
