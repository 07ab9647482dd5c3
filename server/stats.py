"""Plain statistics the engine and servicer emit; ``server.metrics`` turns them into
Prometheus series. Nothing here knows about Prometheus, gRPC or torch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

PHASES = ("schedule", "join", "resume", "park", "drop", "step", "leave", "update", "f", "model")
"""Where a worker's busy time goes (:class:`PhaseTimes`): the scheduler's decision and its
accounting (``schedule``, ``update``); the executor's row changes (``join``, ``resume``,
``park``, ``drop``, ``leave``) and the solver's own arithmetic (``step``), each without the
time spent inside f (``f``) or the model outside the ODE (``model``: ODE-Net's downsampling
and head, a CNF's nothing)."""


@dataclass(frozen=True)
class StepStats:
    """One solver step over a running batch."""

    model: str
    method: str
    batch_size: int
    max_batch: int
    rejected: int
    preempted: int = 0  # items parked by the plan of this step
    precision: str = "float32"  # what f was evaluated in


@dataclass(frozen=True)
class IterationStats:
    """One worker iteration (``schedule → step → update``): seconds per phase (:data:`PHASES`)
    and the rows it moved, so an operator sees what the engine's own bookkeeping costs."""

    model: str
    seconds: tuple[tuple[str, float], ...]
    joined: int = 0
    resumed: int = 0
    parked: int = 0
    dropped: int = 0


class PhaseTimes:
    """Wall seconds per phase of the current iteration. ``phase`` times a block; ``inner``
    wraps a function (f, the model outside the ODE) whose time is its own phase and is taken
    out of whichever block it ran in, so the phases add up to the busy time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner = 0.0  # seconds in inner functions, so far this iteration

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin, inner = self.clock(), self._inner
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - begin - (self._inner - inner)

    def inner(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            begin = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.clock() - begin
                self.seconds[name] += elapsed
                self._inner += elapsed

        return timed

    def take(self) -> tuple[tuple[str, float], ...]:
        """This iteration's seconds per phase; the next iteration starts from zero."""
        taken = tuple((name, self.seconds[name]) for name in PHASES if self.seconds.get(name))
        self.seconds.clear()
        self._inner = 0.0
        return taken


@dataclass(frozen=True)
class QueueStats:
    model: str
    queued: int
    running: int
    capacity: int  # the most items this model's queue takes


@dataclass(frozen=True)
class ItemStats:
    """Items that left the batch, with what each cost."""

    model: str
    method: str
    nfe: tuple[int, ...]
    statuses: tuple[str, ...]
    precision: str = "float32"


@dataclass(frozen=True)
class RequestEndStats:
    """A request the engine ended before it finished, for a reason worth counting."""

    model: str
    reason: str  # "budget_exhausted"


@dataclass(frozen=True)
class WorkerStats:
    """A model worker's life: ``restart`` after it crashed."""

    model: str
    event: str


@dataclass(frozen=True)
class CompileStats:
    """f compiled for one padded batch size (``compile_dynamics``): what it cost, and whether
    the compiled f measured faster than eager and so is used."""

    model: str
    rows: int
    precision: str
    seconds: float
    kept: bool


@dataclass(frozen=True)
class WarmUpStats:
    """A model version's warm-up before it was served: how long its solves took."""

    model: str
    seconds: float


@dataclass(frozen=True)
class RequestStats:
    """One finished RPC, successful or not."""

    model: str
    method: str
    rpc: str
    code: str  # gRPC status code name, e.g. "OK", "INVALID_ARGUMENT"
    latency_seconds: float
    queue_seconds: float | None = None
    compute_seconds: float | None = None
    expected_nfe: float | None = None  # the model card's NFE for these items, where it has one
    priority: int | None = None  # the request's priority level, once validated
    auto_tol: float | None = None  # the tolerance chosen for an ``auto`` request
    precision: str = "none"  # what f was evaluated in, once validated


Stats = (
    StepStats
    | IterationStats
    | QueueStats
    | ItemStats
    | RequestEndStats
    | WorkerStats
    | WarmUpStats
    | CompileStats
    | RequestStats
)


class StatsSink(Protocol):
    def __call__(self, stats: Stats) -> None: ...


def discard(stats: Stats) -> None:
    """A sink for callers that do not collect metrics."""
