"""The scheduler's settings, in one object: built once from the server's configuration
(``ServerConfig.engine()``) and handed whole to every model's scheduler and its policy."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import policy_class

GUARANTEED_SHARE = 0.25
"""The default fraction of a priority level's batch slots split equally between its requests."""
LOWER_LEVEL_SHARE = 0.1
"""The default fraction of the free rows each priority level leaves the less urgent levels while
they have work (at least one row): strict priority, without starvation."""
CLIENT_QUEUE_SHARE = 0.5
"""The default fraction of the queue room left free by other clients that one client may hold."""
TIME_ALONE_WEIGHT = 2.0
"""How many times its time alone a request's virtual deadline lies after its arrival: the fair
policy's order beyond the guaranteed share. Larger lets cheap requests overtake dear ones
further; under open-loop mixed load 2 lowered the loose/tight p99 against 1 at the same overall
p99, and 4 raised the overall p99 (docs/server.md)."""
AUTO_HEADROOM = 0.25
"""The default share of its target within which ``auto`` must be predicted to finish: forecasts
made at arrival miss the work that arrives after, and under overload that is most (at a half,
fewer requests were on time; docs/server.md)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How one model's scheduler decides.

    ``max_batch``: most running items; ``max_queued``: most items waiting or parked.
    ``policy``: the name of a registered policy (:data:`server.scheduling.POLICIES`).
    ``default_priority``: the level of requests that name none. ``client_queue_share`` and
    ``auto_headroom`` apply whatever the policy; ``guaranteed_share`` and ``lower_level_share``
    are the ``fair`` policy's, ``max_delay`` (seconds) the ``static`` one's. Invalid settings
    are refused here, with a ``ValueError`` naming them."""

    max_batch: int = 256
    max_queued: int = 4096
    policy: str = "fair"
    max_delay: float = 0.005
    default_priority: int = 1
    guaranteed_share: float = GUARANTEED_SHARE
    lower_level_share: float = LOWER_LEVEL_SHARE
    client_queue_share: float = CLIENT_QUEUE_SHARE
    auto_headroom: float = AUTO_HEADROOM

    def __post_init__(self) -> None:
        policy_class(self.policy)
        if self.max_batch < 1 or self.max_queued < 1:
            raise ValueError("max_batch and max_queued must be >= 1")
        if not 0.0 <= self.guaranteed_share <= 1.0:
            raise ValueError(f"guaranteed_share must be in [0, 1], got {self.guaranteed_share}")
        if not 0.0 < self.auto_headroom <= 1.0:
            raise ValueError(f"auto_headroom must be in (0, 1], got {self.auto_headroom}")
        if not 0.0 <= self.lower_level_share < 1.0:
            raise ValueError(f"lower_level_share must be in [0, 1), got {self.lower_level_share}")
        if not 0.0 < self.client_queue_share <= 1.0:
            raise ValueError(f"client_queue_share must be in (0, 1], got {self.client_queue_share}")
