"""Plain statistics the engine and servicer emit; ``server.metrics`` turns them into
Prometheus series. Nothing here knows about Prometheus, gRPC or torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


Stats = StepStats | QueueStats | ItemStats | RequestEndStats | WorkerStats | WarmUpStats | CompileStats | RequestStats


class StatsSink(Protocol):
    def __call__(self, stats: Stats) -> None: ...


def discard(stats: Stats) -> None:
    """A sink for callers that do not collect metrics."""
