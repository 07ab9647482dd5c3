"""The interface every scheduling policy implements.

A policy decides, before each solver step, how many running items each request holds; the
scheduler does the rest (admission, deadlines, budgets, forecasts, parking and resuming rows).
A new policy is a module with a :class:`Policy` subclass and one line in
:data:`server.scheduling.registry.POLICIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .requests import Request

if TYPE_CHECKING:
    from .config import SchedulerConfig


@dataclass(frozen=True)
class Workload:
    """What a policy decides over: the requests not ended (oldest first) and the batch now."""

    requests: Sequence[Request]
    running: int  # items in the running batch
    rows: int  # items holding a row of solver state: running or parked


class Policy(ABC):
    """Slots per request for the next step, and the order of each priority level's queue
    (which the scheduler's forecasts follow)."""

    holds_finished: ClassVar[bool] = False
    """True: a finished request is handed back only once the whole batch has ended."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abstractmethod
    def slots(self, work: Workload, now: float) -> dict[int, int] | None:
        """Running items each request should hold after this step, by request id (a request
        left out: none; fewer than it runs: the last admitted are parked). ``None`` leaves
        the batch as it is."""

    def rank(self, arrival: float, virtual_deadline: float) -> float:
        """A request's place in its priority level's queue (earlier is served first), from its
        arrival time and its virtual deadline (:attr:`Request.virtual_deadline`)."""
        return arrival

    def order(self, request: Request) -> tuple[float, int]:
        """The sort key of ``request`` in its level's queue: its rank, then its arrival."""
        return (self.rank(request.enqueued_at, request.virtual_deadline), request.id)

    def wake_after(self, work: Workload, now: float) -> float | None:
        """Nothing steps: seconds until the policy may start something without new work
        arriving (None: not before something changes)."""
        return None
