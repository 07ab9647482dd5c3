"""The interface every scheduling policy implements.

A policy decides, before each solver step, how many running items each request holds; the
scheduler does the rest (admission, deadlines, budgets, forecasts, parking and resuming rows).
A new policy is a module with a :class:`Policy` subclass and one line in
:data:`server.scheduling.registry.POLICIES`.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .requests import Request

if TYPE_CHECKING:
    from .config import SchedulerConfig


class Level:
    """One priority level's requests not ended, kept in the policy's order (:meth:`Policy.order`)
    as they arrive and leave, with the items they still need a slot for: a policy reads as much
    of the queue as it hands slots to, not the whole of it, at every step."""

    def __init__(self) -> None:
        self._keys: list[tuple[float, int]] = []
        self._requests: list[Request] = []
        self._key_of: dict[int, tuple[float, int]] = {}  # by request id: where it stands
        self.demand = 0  # waiting, running and parked items of its requests (kept by the scheduler)

    def add(self, request: Request, key: tuple[float, int]) -> None:
        position = bisect.bisect(self._keys, key)
        self._keys.insert(position, key)
        self._requests.insert(position, request)
        self._key_of[request.id] = key

    def remove(self, request: Request) -> None:
        position = bisect.bisect_left(self._keys, self._key_of.pop(request.id))
        del self._keys[position], self._requests[position]

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)


@dataclass(frozen=True)
class Workload:
    """What a policy decides over: the requests not ended (oldest first), the same by priority
    level in the policy's order, those holding running items, and the batch now."""

    requests: Collection[Request]
    running: int  # items in the running batch
    rows: int  # items holding a row of solver state: running or parked
    levels: Mapping[int, Level]  # by priority; some may be empty
    holding: Collection[Request]  # requests with running items


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
