"""Traces of calls with OpenTelemetry: the one module that imports it, and only imported when
``otlp_endpoint`` is set. A call's root span continues the caller's W3C ``traceparent``; its
stages (receive, queue, solve with its join, response) are built when the call ends, with
explicit times from the engine's timeline, so tracing adds nothing to the engine's loop or to
a solver step."""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .api import CallRecord, Code, InferenceResult, SolveStatus

SERVER_FAULTS = frozenset({Code.INTERNAL, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.UNIMPLEMENTED})
"""Codes that mark a call's span as an error: the server's failures, not the client's mistakes
(as OpenTelemetry's conventions for RPC servers have it)."""
EXPORT_TIMEOUT_S = 5.0
_W3C = TraceContextTextMapPropagator()


def tracer_provider(sample_ratio: float = 1.0, version: str = "unknown") -> TracerProvider:
    """A provider for odeserve's spans: service ``odeserve``; a call without a caller's
    ``traceparent`` is sampled with probability ``sample_ratio``, one with it as its caller
    decided."""
    resource = Resource.create({"service.name": "odeserve", "service.version": version})
    return TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))


class Tracing:
    """A :class:`server.calls.CallTracer` over a tracer provider (tests give one with an
    in-memory exporter; :meth:`otlp` one that sends to a collector)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("odeserve")

    @classmethod
    def otlp(cls, endpoint: str, sample_ratio: float, version: str) -> Tracing:
        """Spans batched to the collector at ``endpoint`` over OTLP/gRPC (``http://``:
        plaintext); the exporter's ``OTEL_EXPORTER_OTLP_*`` variables (headers, certificates)
        apply."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider = tracer_provider(sample_ratio, version)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)))
        return cls(provider)

    def start(self, rpc: str, headers: Mapping[str, str], begin: float) -> CallTrace:
        parent = _W3C.extract(headers)
        now = time.time_ns()  # the call's begin, on the wall clock spans take
        span = self.tracer.start_span(
            rpc, context=parent, kind=SpanKind.SERVER, start_time=now, attributes={"rpc.method": rpc}
        )
        offset = now - round(begin * 1e9)
        traced = span.is_recording() or trace.get_current_span(parent).get_span_context().is_valid
        return CallTrace(
            self.tracer, span, begin, offset, f"{span.get_span_context().trace_id:032x}" if traced else None
        )

    def close(self) -> None:
        self.provider.shutdown()


class CallTrace:
    """One call's root span, open while the call runs; its children are made at :meth:`end`.
    ``trace_id`` names the trace in logs when there is one to find (recorded here, or the
    caller's)."""

    def __init__(self, tracer: trace.Tracer, span: Span, begin: float, offset: int, trace_id: str | None) -> None:
        self.tracer, self.span, self.begin, self.offset, self.trace_id = tracer, span, begin, offset, trace_id

    def _ns(self, monotonic: float) -> int:
        return self.offset + round(monotonic * 1e9)

    def end(self, record: CallRecord, code: Code, end: float) -> None:
        span = self.span
        if span.is_recording():
            span.set_attributes(
                {
                    "odeserve.request_id": record.request_id,
                    "odeserve.code": code.value,
                    "odeserve.model": record.model,
                    "odeserve.method": record.method,
                    "odeserve.precision": record.precision,
                }
            )
            if record.priority is not None:
                span.set_attribute("odeserve.priority", record.priority)
            if code in SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, code.value))
            if record.result is not None and record.result.timeline is not None:
                self._stages(record.result, end)
        span.end(end_time=self._ns(end))

    def _stages(self, result: InferenceResult, end: float) -> None:
        """receive → queue → solve (join inside) → response, from the engine's timeline."""
        timeline = result.timeline
        assert timeline is not None
        call = trace.set_span_in_context(self.span)
        self._span("receive", call, self.begin, timeline.submitted)
        self._span("queue", call, timeline.submitted, timeline.started)
        solve = self.tracer.start_span(
            "solve", context=call, start_time=self._ns(timeline.started), attributes=_solve_attributes(result)
        )
        self._span("join", trace.set_span_in_context(solve), timeline.started, timeline.joined)
        solve.end(end_time=self._ns(timeline.finished))
        self._span("response", call, timeline.finished, end)

    def _span(self, name: str, parent: Context, start: float, end: float) -> None:
        self.tracer.start_span(name, context=parent, start_time=self._ns(start)).end(end_time=self._ns(end))


def _solve_attributes(result: InferenceResult) -> dict[str, str | int | float]:
    solved, nfe = result.solved, result.nfe
    attributes: dict[str, str | int | float] = {
        "odeserve.model": result.model,
        "odeserve.model_version": result.model_version,
        "odeserve.items": len(nfe),
        "odeserve.rtol": solved.rtol,
        "odeserve.atol": solved.atol,
        "odeserve.method": solved.method,
        "odeserve.precision": solved.precision,
        "odeserve.preemptions": solved.preemptions,
        "odeserve.nfe": int(nfe.sum()),
        "odeserve.nfe_max": int(nfe.max()),
        "odeserve.failed_items": int((result.status != int(SolveStatus.SUCCESS)).sum()),
    }
    if result.steps is not None:
        attributes["odeserve.steps"] = int(result.steps.sum())
        attributes["odeserve.steps_max"] = int(result.steps.max())
    return attributes
