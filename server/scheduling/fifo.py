"""``fifo``: first come, first served; nothing is preempted (the engine before v2)."""

from __future__ import annotations

from .policy import Policy, Workload
from .requests import State


class FirstComeFirstServed(Policy):
    """Running items keep their slots; free ones go to waiting items in arrival order."""

    def slots(self, work: Workload, now: float) -> dict[int, int] | None:
        free = self.config.max_batch - work.running
        wanted = {request.id: request.count(State.RUNNING) for request in work.holding}
        for request in work.requests:  # oldest first, only until the free slots are given
            if free <= 0:
                break
            extra = min(request.count(State.WAITING) + request.count(State.PREEMPTED), free)
            if extra:
                wanted[request.id], free = request.count(State.RUNNING) + extra, free - extra
        return wanted
