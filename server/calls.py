"""One call's lifecycle, the same under every transport (gRPC, HTTP): hold its share of the
memory budget, run the protocol's translator, turn any failure into a :class:`Code` and a
message (a bug fails its call, never the server), release what it held, and record the outcome
for metrics. Transports only read bytes, say who is calling and write the answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .api import Caller, CallRecord, Code, RequestError
from .service import ByteBudget, Call
from .stats import RequestStats, StatsSink

log = logging.getLogger("server.calls")

Response = TypeVar("Response")
INTERNAL_MESSAGE = "internal error; the server logged the details"


@dataclass(frozen=True)
class Answer(Generic[Response]):
    """How a call ended: OK with a response, or a code and message."""

    code: Code
    message: str = ""
    response: Response | None = None


class CallRunner:
    def __init__(self, budget: ByteBudget, stats: StatsSink) -> None:
        self.budget, self.stats = budget, stats

    async def run(
        self,
        rpc: str,
        body: Callable[[Call], Awaitable[Response]],
        *,
        remaining: Callable[[], float | None],
        caller: Callable[[], Caller],
        expired: Callable[[], bool] = lambda: False,
    ) -> Answer[Response]:
        """Run ``body`` (read, decode, translate) as call ``rpc``. A cancelled call (its client
        left, or its deadline passed) is recorded and re-raised for the transport to end."""
        begin = time.perf_counter()
        record = CallRecord(rpc=rpc)
        reservation = self.budget.reservation()
        code = Code.OK
        try:
            response = await body(Call(remaining, record, reservation, caller()))
            return Answer(Code.OK, response=response)
        except RequestError as error:
            code = error.code
            return Answer(error.code, error.message)
        except asyncio.CancelledError:
            code = Code.DEADLINE_EXCEEDED if expired() else Code.CANCELLED
            raise
        except Exception:  # noqa: BLE001 - a bug fails its call, never the server
            log.exception("%s failed", rpc)
            code = Code.INTERNAL
            return Answer(Code.INTERNAL, INTERNAL_MESSAGE)
        finally:
            reservation.release()
            self._record(record, code, time.perf_counter() - begin)

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
