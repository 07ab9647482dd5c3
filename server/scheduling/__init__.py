"""Scheduling: which items share each solver step.

``requests``: requests, items, their states and costs, the plan of a step; ``step_time``: the
step-time model; ``policy``: the interface of a policy; ``fair``, ``fifo``, ``static``: the
policies, registered by name in ``registry``; ``config``: the settings; ``scheduler``: the
lifecycle, admission, budgets and forecasts that every policy shares.
"""

from .config import (
    AUTO_HEADROOM,
    CLIENT_QUEUE_SHARE,
    GUARANTEED_SHARE,
    LOWER_LEVEL_SHARE,
    TIME_ALONE_WEIGHT,
    SchedulerConfig,
)
from .fair import FairShare
from .fifo import FirstComeFirstServed
from .policy import Level, Policy, Workload
from .registry import POLICIES, policy_class
from .requests import (
    BudgetExhausted,
    Cancelled,
    Candidate,
    Clock,
    Cost,
    Expired,
    Item,
    Plan,
    QueueFull,
    Request,
    State,
    StepOutputs,
)
from .scheduler import Scheduler
from .static import StaticBatching
from .step_time import StepTimer

__all__ = [
    "AUTO_HEADROOM",
    "CLIENT_QUEUE_SHARE",
    "GUARANTEED_SHARE",
    "LOWER_LEVEL_SHARE",
    "POLICIES",
    "TIME_ALONE_WEIGHT",
    "BudgetExhausted",
    "Cancelled",
    "Candidate",
    "Clock",
    "Cost",
    "Expired",
    "FairShare",
    "FirstComeFirstServed",
    "Item",
    "Level",
    "Plan",
    "Policy",
    "QueueFull",
    "Request",
    "Scheduler",
    "SchedulerConfig",
    "State",
    "StaticBatching",
    "StepOutputs",
    "StepTimer",
    "Workload",
    "policy_class",
]
