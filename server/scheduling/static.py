"""``static``: a batch starts only when nothing runs and either ``max_batch`` items wait or the
oldest has waited ``max_delay``; it runs to its end and its requests complete together (for
comparison with continuous batching)."""

from __future__ import annotations

from .fifo import FirstComeFirstServed
from .policy import Workload


class StaticBatching(FirstComeFirstServed):
    holds_finished = True

    def slots(self, work: Workload, now: float) -> dict[int, int] | None:
        if work.rows:
            return None
        waiting = sorted(work.requests, key=lambda r: r.id)
        count = sum(len(r.items) for r in waiting)
        if not waiting or (count < self.config.max_batch and now - waiting[0].enqueued_at < self.config.max_delay):
            return None
        return super().slots(work, now)

    def wake_after(self, work: Workload, now: float) -> float | None:
        """Seconds until the delay lets the oldest waiting item start."""
        if work.rows:
            return None
        waiting = [r.enqueued_at for r in work.requests if r.started_at is None]
        return None if not waiting else max(0.0, min(waiting) + self.config.max_delay - now)
