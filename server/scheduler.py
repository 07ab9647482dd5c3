"""Which queued items join the running batch, and when. Plain Python: no torch, no gRPC.

The clock is injected, so queueing, deadlines and the static mode's delay are testable
without threads or sleeps.

* ``continuous``: between any two solver steps, waiting items fill the free slots of the
  running batch (FIFO, up to ``max_batch``); finished items leave at every step.
* ``static``: a batch starts only when nothing runs and either ``max_batch`` items wait or
  the oldest has waited ``max_delay``; it runs to its end before the next one starts, and
  the engine hands its results back together, as a generic batching server does.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]
MODES = ("continuous", "static")


class QueueFull(Exception):
    """Accepting the request would exceed the queue limit; nothing was queued."""


@dataclass(eq=False)
class Request:
    """A client request: some items that complete together."""

    items: int
    enqueued_at: float
    deadline: float | None = None  # on the scheduler's clock
    done: int = 0
    cancelled: bool = False
    started_at: float | None = None  # when its first item joined a batch
    id: int = field(default_factory=itertools.count().__next__)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class Item:
    request: Request
    index: int
    payload: Any  # opaque here: whatever the executor needs
    id: int = field(default_factory=itertools.count().__next__)


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        max_queued: int,
        mode: str = "continuous",
        max_delay: float = 0.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"batching mode must be one of {MODES}, got {mode!r}")
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be >= 1")
        self.max_batch, self.max_queued, self.mode, self.max_delay, self.clock = max_batch, max_queued, mode, max_delay, clock
        self._queue: deque[Item] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, payloads: list[Any], deadline: float | None = None) -> tuple[Request, list[Item]]:
        """Queue a request's items, all or none."""
        if self.queued + len(payloads) > self.max_queued:
            raise QueueFull(f"{self.queued} items queued; {len(payloads)} more would exceed the limit of {self.max_queued}")
        request = Request(items=len(payloads), enqueued_at=self.clock(), deadline=deadline)
        items = [Item(request, i, payload) for i, payload in enumerate(payloads)]
        self._queue.extend(items)
        return request, items

    def cancel(self, request: Request) -> None:
        request.cancelled = True

    def purge(self) -> list[Item]:
        """Remove and return queued items whose request was cancelled or ran out of time."""
        now = self.clock()
        dead = [item for item in self._queue if not self._alive(item.request, now)]
        if dead:
            self._queue = deque(item for item in self._queue if self._alive(item.request, now))
        return dead

    def admit(self, running: int) -> list[Item]:
        """Items that join the running batch now, removed from the queue (call ``purge``
        first so dead requests do not take slots)."""
        now = self.clock()
        if self.mode == "static":
            if running or not self._queue:
                return []
            if len(self._queue) < self.max_batch and now - self._queue[0].request.enqueued_at < self.max_delay:
                return []
        free = self.max_batch - running
        admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        for item in admitted:
            if item.request.started_at is None:
                item.request.started_at = now
        return admitted

    def dropped(self, running: Iterable[Item]) -> list[Item]:
        """Running items whose request was cancelled or ran out of time: they leave now."""
        now = self.clock()
        return [item for item in running if not self._alive(item.request, now)]

    def wake_after(self) -> float | None:
        """Seconds until the static mode's delay lets the oldest queued item start."""
        if self.mode != "static" or not self._queue:
            return None
        return max(0.0, self._queue[0].request.enqueued_at + self.max_delay - self.clock())

    def _alive(self, request: Request, now: float) -> bool:
        return not request.cancelled and not request.expired(now)
