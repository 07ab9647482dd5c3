"""Per-sample solve outcomes.

Inside the solver a status is one small integer per sample, so a batch can hold samples that
succeeded next to samples that failed. Only at the public edge does a failure become an
exception, with a message that says what to change.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Status(IntEnum):
    RUNNING = 0
    SUCCESS = 1
    MAX_STEPS = 2
    MAX_NFE = 3
    STEP_SIZE_UNDERFLOW = 4
    NON_FINITE = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.RUNNING: "still running",
    Status.SUCCESS: "success",
    Status.MAX_STEPS: "max_steps reached: raise max_steps or loosen rtol/atol",
    Status.MAX_NFE: "max_nfe reached: raise the NFE budget or loosen rtol/atol",
    Status.STEP_SIZE_UNDERFLOW: (
        "step size underflow: the problem is too stiff for an explicit method at this "
        "tolerance; loosen rtol/atol or shorten the time span"
    ),
    Status.NON_FINITE: (
        "non-finite values (NaN/Inf) in the state or in func's output: check func and y0, "
        "or tighten rtol/atol if the solution blows up only numerically"
    ),
}


class SolverError(RuntimeError):
    """Raised at the public edge when at least one sample did not reach the end time."""

    def __init__(self, status: torch.Tensor, context: str = "") -> None:
        self.status = status.detach().cpu()
        codes = self.status.reshape(-1).tolist()
        failed = [(i, Status(c)) for i, c in enumerate(codes) if c != Status.SUCCESS]
        first_index, first = failed[0]
        kinds = sorted({s for _, s in failed})
        summary = "; ".join(f"{s.name}: {s.message}" for s in kinds)
        prefix = f"{context}: " if context else ""
        super().__init__(
            f"{prefix}{len(failed)} of {len(codes)} samples failed (first: sample {first_index}, "
            f"{first.name}). {summary}"
        )


def raise_for_status(status: torch.Tensor) -> None:
    if not bool((status == Status.SUCCESS).all()):
        raise SolverError(status)
