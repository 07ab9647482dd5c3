"""``fair`` (the default): strict priority levels, a fair share of the batch per request within a
level, and preemption.

Priority levels are strict (lower value is more urgent, Triton's convention). Within a level,
``guaranteed_share`` of the slots (and at least one per request, while there are slots for
all) is split max-min fairly between requests (water-filling by item count: one that needs
fewer slots than an equal share gets all it needs, the others the same number each), so no
request waits while another holds the batch. The other slots go by earliest *virtual
deadline* — the call's deadline, or its arrival plus twice what it would take alone on the
batch (``TIME_ALONE_WEIGHT``), whichever is earlier — each request taking what it still
needs. Work is served nearly in arrival order (the tail stays near that of
first-come-first-served), yet a cheap request overtakes an expensive one that arrived shortly
before it. A request holding more than it is allocated is preempted, row by row, for the
others. No level starves: while less urgent levels have work, each level leaves them
``lower_level_share`` of the rows still free (at least one), so a flood of urgent work slows
the others down but never stops them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from .policy import Policy, Workload
from .requests import Request


class FairShare(Policy):
    def rank(self, arrival: float, virtual_deadline: float) -> float:
        return virtual_deadline

    def slots(self, work: Workload, now: float) -> dict[int, int]:
        """Slots per request: priority between levels (each leaving the less urgent ones
        ``lower_level_share`` of the free slots while they have work); within one, the
        guaranteed share split max-min fairly, the rest by earliest virtual deadline. Requests
        left out get none. Reads each level only as far as it hands out slots."""
        config = self.config
        shares: dict[int, int] = {}
        left = config.max_batch
        below = sum(level.demand for level in work.levels.values())
        for priority in sorted(work.levels):
            level = work.levels[priority]  # in virtual-deadline order (rank)
            if not level:
                continue
            below -= level.demand
            # Rows kept for the less urgent levels while they have work: none of them starves.
            kept = min(below, math.ceil(config.lower_level_share * left)) if config.lower_level_share else 0
            free = left - kept
            # At least a slot per request while there are slots for all: nobody waits for a first one.
            pool = min(free, max(int(config.guaranteed_share * free), len(level)))
            if len(level) > pool:
                # More requests than free slots: max-min gives one each to the earliest virtual
                # deadlines and nothing is left over.
                for request in itertools.islice((r for r in level if r.demand), pool):
                    shares[request.id] = 1
                    left -= 1
                continue
            requests = list(level)  # no more of them than free slots
            demand = {r.id: r.demand for r in requests}
            guaranteed = _water_fill(requests, demand, pool)
            spare = free - sum(guaranteed.values())
            for request in requests:
                extra = min(demand[request.id] - guaranteed[request.id], spare)
                shares[request.id] = guaranteed[request.id] + extra
                spare -= extra
            left -= sum(shares[r.id] for r in requests)
        return shares


def _by_virtual_deadline(request: Request) -> tuple[float, int]:
    return (request.virtual_deadline, request.id)


def _water_fill(requests: Iterable[Request], demand: dict[int, int], slots: int) -> dict[int, int]:
    """Max-min fair split of ``slots`` by demand: requests needing less than an equal share
    get all they need, the others the same number each; slots that do not divide evenly go
    to those with the earliest virtual deadlines."""
    pending = sorted(requests, key=lambda r: demand[r.id])
    shares = {r.id: 0 for r in pending}
    left = max(0, slots)
    for position, request in enumerate(pending):
        rest = len(pending) - position
        if demand[request.id] * rest <= left:
            shares[request.id] = demand[request.id]
            left -= demand[request.id]
            continue
        capped = pending[position:]
        level, remainder = divmod(left, rest)
        for other in capped:
            shares[other.id] = level
        for other in sorted(capped, key=_by_virtual_deadline)[:remainder]:
            shares[other.id] += 1
        break
    return shares
