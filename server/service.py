"""The one path of every compute request, whatever wire protocol it came in on: find the
model, check the request against the server's limits, let the model's adapter prepare its
items, hold its share of the memory budget, schedule it on the engine and await the result.
No gRPC here; errors are :class:`server.api.RequestError`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from .adapters import Limits
from .api import (
    Caller,
    CallRecord,
    Code,
    InferenceRequest,
    InferenceResult,
    RequestError,
    Solved,
    SolveStatus,
    invalid,
    quoted,
)
from .config import ServerConfig
from .engine import (
    BudgetExhausted,
    Engine,
    EngineClosed,
    QueueFull,
    RequestCancelled,
    RequestExpired,
    ShutDown,
    WorkerFailed,
    WorkerRetired,
)
from .executor import Work
from .logs import REQUEST_ID, usable_request_id
from .models import ServedModel
from .validation import accuracy_settings, find_model, precision_setting, scheduling_settings

log = logging.getLogger("server.service")

_SUBMIT_ATTEMPTS = 3
_ENGINE_ERRORS: list[tuple[type[Exception], Code, str]] = [
    (QueueFull, Code.RESOURCE_EXHAUSTED, ""),
    (BudgetExhausted, Code.RESOURCE_EXHAUSTED, ""),
    (WorkerFailed, Code.INTERNAL, ""),
    (
        RequestExpired,
        Code.DEADLINE_EXCEEDED,
        "the request's deadline passed before it finished; its items were stopped",
    ),
    (ShutDown, Code.UNAVAILABLE, ""),
    (RequestCancelled, Code.CANCELLED, "the request was cancelled; its items were stopped"),
    (EngineClosed, Code.UNAVAILABLE, "the server is shutting down; retry on another replica"),
]
_MIB = 1024 * 1024


class ByteBudget:
    """Bytes held by requests in flight — their messages, decoded inputs and solver state —
    against a limit. Used from the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    def __init__(self, budget: ByteBudget) -> None:
        self.budget, self.held = budget, 0

    def add(self, size: int) -> None:
        """Hold ``size`` more bytes, or refuse with RESOURCE_EXHAUSTED (holding nothing more)."""
        budget = self.budget
        if budget.used + size > budget.limit:
            raise RequestError(
                Code.RESOURCE_EXHAUSTED,
                f"the server holds {budget.used / _MIB:.1f} MiB of requests in flight; {size / _MIB:.1f} MiB more would "
                f"exceed its limit of {budget.limit / _MIB:.0f} MiB (max_inflight_bytes): retry later or send smaller requests",
            )
        budget.used += size
        self.held += size

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


class Call:
    """One call as the service sees it: time left before its deadline, the record its
    metrics come from, its share of the memory budget, and who sent it."""

    def __init__(
        self,
        remaining: Callable[[], float | None],
        record: CallRecord,
        reservation: Reservation,
        caller: Caller = Caller(),
    ) -> None:
        self.remaining, self.record, self.reservation, self.caller = remaining, record, reservation, caller

    def name_request(self, request_id: str) -> None:
        """The protocol's own id for the request (the Open Inference ``id``) names it from now
        on, in logs, traces and response metadata, when usable there."""
        usable = usable_request_id(request_id)
        if usable is not None:
            self.record.request_id = usable
            REQUEST_ID.set(usable)


class InferenceService:
    def __init__(self, models: dict[str, ServedModel], engine: Engine, config: ServerConfig) -> None:
        self.models, self.engine, self.config = models, engine, config
        self.limits = Limits(max_items=config.max_items_per_request, max_abs_input=config.max_abs_input)
        self.budget = ByteBudget(config.max_inflight_bytes)
        self.draining = False

    def model(self, name: str, version: str = "") -> ServedModel:
        return find_model(self.models, name, version)

    async def infer(self, request: InferenceRequest, call: Call) -> InferenceResult:
        """Solve a request's items; raises :class:`RequestError`."""
        if self.draining:
            raise RequestError(Code.UNAVAILABLE, "the server is shutting down; retry on another replica")
        for attempt in range(_SUBMIT_ATTEMPTS):
            model, works, remaining, scheduling = self._prepare(request, call, first=attempt == 0)
            try:
                engine_request, future = self.engine.submit(model.key, works, timeout=remaining, scheduling=scheduling)
                break
            except WorkerRetired:  # reloaded between lookup and submit: the new version takes it
                if attempt == _SUBMIT_ATTEMPTS - 1 or self.draining:
                    raise RequestError(Code.UNAVAILABLE, "the model is being reloaded; retry") from None
            except Exception as error:  # noqa: BLE001 - engine refusals map to codes
                raise _engine_error(error) from None
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.engine.cancel(model.key, engine_request)
            raise
        except Exception as error:  # noqa: BLE001
            raise _engine_error(error) from None
        succeeded = np.array([int(s) == SolveStatus.SUCCESS for s in result.statuses])
        outputs = model.adapter.present(request.kind, result.outputs, succeeded)
        solved = Solved(result.rtol, result.atol, works[0].method, result.preemptions, works[0].precision)
        inference = InferenceResult(
            model=model.name,
            model_version=model.version,
            outputs=outputs,
            nfe=np.asarray(result.nfe, dtype=np.uint32),
            status=np.asarray([int(s) for s in result.statuses], dtype=np.int32),
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
            solved=solved,
            steps=np.asarray(result.steps, dtype=np.int64),
            timeline=result.timeline,
        )
        record = call.record
        record.result = inference
        per_item = model.expected_nfe(solved.method, solved.rtol)
        record.expected_nfe = None if per_item is None else per_item * len(works)
        record.auto_tol = solved.rtol if scheduling.auto else None
        return inference

    def _prepare(self, request: InferenceRequest, call: Call, first: bool):
        model = find_model(self.models, request.model, request.version)
        record = call.record
        record.model = model.name
        if request.kind not in model.adapter.signatures:
            raise invalid(f"model {quoted(model.name)} is a {model.task.value} model: {record.rpc} does not apply")
        rtol, atol, method, max_nfe = accuracy_settings(request.accuracy, model, self.config)
        record.method = method
        precision = precision_setting(request.accuracy, model, self.config, rtol, atol)
        record.precision = precision
        remaining = call.remaining()
        if remaining is not None and remaining <= 0:
            raise RequestError(Code.DEADLINE_EXCEEDED, "the call's deadline had passed when it arrived")
        scheduling = scheduling_settings(request.accuracy, request.scheduling, remaining, self.config, call.caller)
        record.priority = scheduling.priority
        inputs = request.inputs()
        rows = model.adapter.prepare(request.kind, inputs, self.limits)
        if first:
            decoded = sum(array.nbytes for array in inputs.values())
            call.reservation.add(decoded + rows.nbytes + len(rows) * model.adapter.state_bytes(request.kind))
        works = [Work(request.kind, row, rtol, atol, method, max_nfe, precision) for row in rows]
        return model, works, remaining, scheduling


def _engine_error(error: Exception) -> RequestError:
    for kind, code, default in _ENGINE_ERRORS:
        if isinstance(error, kind):
            return RequestError(code, str(error) or default)
    log.error("unexpected engine error", exc_info=error)
    return RequestError(Code.INTERNAL, "internal error; the server logged the details")
