"""The scheduling policies by name: the ``policy`` setting picks one. A new policy is a module
with a :class:`~server.scheduling.policy.Policy` subclass and a line here."""

from __future__ import annotations

from .fair import FairShare
from .fifo import FirstComeFirstServed
from .policy import Policy
from .static import StaticBatching

POLICIES: dict[str, type[Policy]] = {
    "fair": FairShare,
    "fifo": FirstComeFirstServed,
    "static": StaticBatching,
}


def policy_class(name: str) -> type[Policy]:
    """The policy registered as ``name``; a ValueError naming the choices for any other."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}") from None
