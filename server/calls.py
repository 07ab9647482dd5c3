"""One call's lifecycle, the same under every transport (gRPC, HTTP): hold its share of the
memory budget, run the protocol's translator, turn any failure into a :class:`Code` and a
message (a bug fails its call, never the server), release what it held, and record the outcome
for metrics. Every call gets a request id for its log lines (and its trace, when a tracer is
configured). Transports only read bytes, say who is calling and write the answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from .api import Caller, CallRecord, Code, RequestError
from .logs import REQUEST_ID, TRACE_ID, new_request_id, usable_request_id
from .service import ByteBudget, Call
from .stats import RequestStats, StatsSink

log = logging.getLogger("server.calls")

Response = TypeVar("Response")
INTERNAL_MESSAGE = "internal error; the server logged the details"
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Answer(Generic[Response]):
    """How a call ended: OK with a response, or a code and message; ``request_id`` names the
    call (for the transport to echo back)."""

    code: Code
    message: str = ""
    response: Response | None = None
    request_id: str = ""


class CallTrace(Protocol):
    """One call's trace, open while it runs; ``trace_id`` (hex) is for the logs."""

    trace_id: str | None

    def end(self, record: CallRecord, code: Code, end: float) -> None:
        """Close the call's spans, from what ``record`` says happened, at ``end`` (on
        ``time.monotonic``'s clock, like the engine's timeline)."""


class CallTracer(Protocol):
    """Where calls are traced (``server.tracing``, the one module that imports OpenTelemetry)."""

    def start(self, rpc: str, headers: Mapping[str, str], begin: float) -> CallTrace:
        """Open call ``rpc``'s trace at ``begin`` (``time.monotonic``), continuing the one its
        ``traceparent`` header names."""

    def close(self) -> None:
        """Send what is left and stop."""


class CallRunner:
    """``tracer``: None (the default) traces nothing and costs nothing."""

    def __init__(self, budget: ByteBudget, stats: StatsSink, tracer: CallTracer | None = None) -> None:
        self.budget, self.stats, self.tracer = budget, stats, tracer

    async def run(
        self,
        rpc: str,
        body: Callable[[Call], Awaitable[Response]],
        *,
        remaining: Callable[[], float | None],
        caller: Callable[[], Caller],
        expired: Callable[[], bool] = lambda: False,
        headers: Mapping[str, str] = _NO_HEADERS,
    ) -> Answer[Response]:
        """Run ``body`` (read, decode, translate) as call ``rpc``. ``headers``: the call's gRPC
        metadata or HTTP headers, keys in lower case (``x-request-id`` names the call unless
        the protocol's message does; ``traceparent`` continues a trace). A cancelled call
        (its client left, or its deadline passed) is recorded and re-raised for the transport
        to end."""
        begin = time.monotonic()
        record = CallRecord(rpc=rpc, request_id=usable_request_id(headers.get("x-request-id")) or new_request_id())
        request_token = REQUEST_ID.set(record.request_id)
        trace = None if self.tracer is None else self.tracer.start(rpc, headers, begin)
        trace_token = None if trace is None else TRACE_ID.set(trace.trace_id)
        reservation = self.budget.reservation()
        code, message, response = Code.OK, "", None
        try:
            response = await body(Call(remaining, record, reservation, caller()))
        except RequestError as error:
            code, message = error.code, error.message
        except asyncio.CancelledError:
            code = Code.DEADLINE_EXCEEDED if expired() else Code.CANCELLED
            raise
        except Exception:  # noqa: BLE001 - a bug fails its call, never the server
            log.exception("%s failed", rpc)
            code, message = Code.INTERNAL, INTERNAL_MESSAGE
        finally:
            reservation.release()
            end = time.monotonic()
            self._record(record, code, end - begin)
            log.debug("%s %s in %.1f ms", rpc, code.value, (end - begin) * 1000)
            if trace is not None:
                trace.end(record, code, end)
            if trace_token is not None:
                TRACE_ID.reset(trace_token)
            REQUEST_ID.reset(request_token)
        return Answer(code, message, response, record.request_id)

    def refused(self, rpc: str, code: Code) -> None:
        """Count a call refused before it reached a translator (unknown method, no token)."""
        self.stats(RequestStats(model="unknown", method="none", rpc=rpc, code=code.value, latency_seconds=0.0))

    def _record(self, record: CallRecord, code: Code, seconds: float) -> None:
        result = record.result
        self.stats(
            RequestStats(
                model=record.model,
                method=record.method,
                rpc=record.rpc,
                code=code.value,
                latency_seconds=seconds,
                queue_seconds=None if result is None else result.queue_seconds,
                compute_seconds=None if result is None else result.compute_seconds,
                expected_nfe=record.expected_nfe,
                priority=record.priority,
                auto_tol=record.auto_tol,
                precision=record.precision,
            )
        )
