"""A scheduling policy made for the tests, to show that a new policy is one module (this one)
and one line in ``server.scheduling.POLICIES`` (the tests add it with ``monkeypatch``)."""

from __future__ import annotations

from server.scheduling import Policy, State, Workload


class NewestFirst(Policy):
    """Running items keep their slots; free ones go to the newest requests first."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.decisions = 0

    def slots(self, work: Workload, now: float) -> dict[int, int]:
        self.decisions += 1
        free = self.config.max_batch - work.running
        wanted = {}
        for request in sorted(work.requests, key=lambda r: r.id, reverse=True):
            extra = min(request.count(State.WAITING) + request.count(State.PREEMPTED), free)
            wanted[request.id], free = request.count(State.RUNNING) + extra, free - extra
        return wanted
