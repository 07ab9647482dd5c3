"""``fifo``: first come, first served; nothing is preempted (the engine before v2)."""

from __future__ import annotations

from .policy import Policy, Workload
from .requests import State


class FirstComeFirstServed(Policy):
    """Running items keep their slots; free ones go to waiting items in arrival order."""

    def slots(self, work: Workload, now: float) -> dict[int, int] | None:
        free = self.config.max_batch - work.running
        wanted = {}
        for request in sorted(work.requests, key=lambda r: r.id):
            extra = min(request.count(State.WAITING) + request.count(State.PREEMPTED), free)
            wanted[request.id], free = request.count(State.RUNNING) + extra, free - extra
        return wanted
