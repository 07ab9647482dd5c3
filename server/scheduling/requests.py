"""What the scheduler keeps for each request and item: their states, costs and the plans it hands
the executor. Plain data: no policy, no torch.

An item is one ODE solve (an image, a point, a sample). Its states:

    WAITING ──► RUNNING ──► FINISHED
                 ▲   │
                 │   ▼
               PREEMPTED            (any of these) ──► CANCELLED / EXPIRED / FAILED

Parking an item is free of loss: its row of solver state is all it needs to resume, so a
preempted item ends bit-identical to one that never was.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]


class QueueFull(Exception):
    """Accepting the request would exceed the queue limit; nothing was queued."""


class BudgetExhausted(Exception):
    """The request's NFE budget cannot pay for what it still needs; its items were stopped."""


class Expired(Exception):
    """The request's deadline passed, or cannot be met."""


class Cancelled(Exception):
    """The client cancelled the request."""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    # Members are singletons: hashing by identity is exact, and in C (Enum's own hashes the name
    # in Python), which the scheduler's per-state counts look up for every request each step.
    __hash__ = object.__hash__

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {State.FINISHED, State.FAILED, State.CANCELLED, State.EXPIRED}
ENDED_BY = {Cancelled: State.CANCELLED, Expired: State.EXPIRED}


@dataclass(frozen=True)
class Cost:
    """What an item's solve costs, in function evaluations: ``start`` to begin (the initial
    evaluations), ``step`` per attempted step, and ``expected`` in all (the model card's mean
    at the request's tolerance; None when the card does not say)."""

    start: int
    step: int
    expected: float | None = None

    def with_expected(self, expected: float | None) -> Cost:
        return Cost(self.start, self.step, expected)

    def steps(self, nfe: float) -> float:
        """Attempted steps an item needs to reach ``nfe`` evaluations, at least one."""
        return max(1.0, (nfe - self.start) / self.step)


@dataclass(frozen=True)
class Candidate:
    """A tolerance an ``auto`` request may be solved at, and its cost there."""

    tol: float
    cost: Cost


@dataclass(eq=False)
class Request:
    """A client request: items that complete together."""

    items: list[Item]
    cost: Cost
    priority: int
    enqueued_at: float
    deadline: float | None = None  # on the scheduler's clock
    budget: int | None = None  # most NFE over all items
    tol: float | None = None  # chosen for an ``auto`` request; None: the items' own
    owner: Any = None  # the client, for fair admission; None: not counted per client
    state: State = State.WAITING
    error: Exception | None = None  # why it did not finish
    nfe: int = 0  # spent so far, over all items
    done: int = 0  # items finished
    started_at: float | None = None  # when its first item joined a batch
    joined_at: float | None = None  # when the step its first items joined in ended
    finished_at: float | None = None
    preemptions: int = 0
    virtual_deadline: float = math.inf  # the fair policy's order for slots beyond the guaranteed
    counts: dict[State, int] = field(default_factory=dict)  # items by state, kept by the scheduler
    demand: int = 0  # items that still need a slot (waiting, running or parked), kept by the scheduler
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def ended(self) -> bool:
        return self.state.terminal

    def count(self, state: State) -> int:
        return self.counts.get(state, 0)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class Item:
    request: Request
    index: int
    payload: Any  # opaque here: whatever the executor needs
    state: State = State.WAITING
    nfe: int = 0
    outcome: Any = None  # the executor's result, once FINISHED
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class Plan:
    """One step's changes to the running batch; the executor applies them, then steps."""

    join: list[Item] = field(default_factory=list)  # start their solves
    resume: list[Item] = field(default_factory=list)  # parked rows back into the batch
    park: list[Item] = field(default_factory=list)  # out of the batch, state kept
    drop: list[Item] = field(default_factory=list)  # running or parked: state discarded
    ended: list[Request] = field(default_factory=list)  # ended while scheduling
    running: int = 0  # rows in the batch once the plan is applied
    wake_after: float | None = None  # nothing to step: seconds until something may start

    @property
    def steps(self) -> bool:
        return self.running > 0


@dataclass(frozen=True)
class StepOutputs:
    """What the executor reports after a step: every stepped item's NFE so far, and the
    outcomes (anything with meaning to the engine) of the items whose solve ended."""

    nfe: dict[int, int]
    finished: dict[int, Any]
