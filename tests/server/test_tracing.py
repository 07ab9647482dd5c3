"""Tracing, request ids and JSON logs, against real servers on 127.0.0.1: one run in this process
(its spans go to OpenTelemetry's in-memory exporter, its log records to caplog) and ``python -m
server`` subprocesses (JSON logs; OTLP to a collector run here; tracing off imports nothing)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from live_server import DENSITIES, ROOT, start_server
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc
from server.app import Server
from server.config import ServerConfig
from server.logs import JsonFormatter, RequestContext, TextFormatter
from server.oip import grpc_predict_v2_pb2 as oip
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from server.tracing import Tracing, tracer_provider

DENSITY = DENSITIES[0]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
STAGES = ("receive", "queue", "solve", "response")
POINTS = np.array([[0.1, 0.2], [1.5, -0.5], [-2.0, 1.0]], dtype=np.float32)


def log_density(tol: float = 1e-4, points: np.ndarray = POINTS, model: str = DENSITY) -> pb.LogDensityRequest:
    return pb.LogDensityRequest(
        model=model,
        points=pb.Tensor(dtype="float32", shape=list(points.shape), data=points.tobytes()),
        accuracy=pb.Accuracy(tol=tol),
    )


class InProcess:
    """A :class:`Server` on an event loop in a thread of this process."""

    def __init__(self, config: ServerConfig, tracer: Tracing | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def build() -> Server:
            return Server(config, tracer)

        self.server = self._await(build())
        self._await(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    def _await(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        assert self._await(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(density_only, exporter):
    provider = tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ServerConfig(checkpoints=density_only, port=0, metrics_port=0, http_port=0, grace_seconds=1)
    running = InProcess(config, Tracing(provider))
    yield running
    running.stop()


@pytest.fixture
def channel(traced, exporter):
    exporter.clear()
    with grpc.insecure_channel(traced.target) as channel:
        yield channel


def spans_of(exporter: InMemorySpanExporter, root_name: str, count: int) -> dict[str, ReadableSpan]:
    """The finished spans by name, once the root ``root_name`` and ``count`` spans in all are in."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        spans = exporter.get_finished_spans()
        if len(spans) >= count and any(span.name == root_name for span in spans):
            break
        time.sleep(0.01)
    assert len(spans) == count, [span.name for span in spans]
    by_name = {span.name: span for span in spans}
    assert len(by_name) == count, [span.name for span in spans]
    return by_name


def trailing(call: grpc.Call) -> dict[str, str]:
    return dict(call.trailing_metadata() or ())


def test_a_traceparent_makes_the_calls_spans_children_of_the_callers_trace(channel, exporter):
    response, call = pb_grpc.InferenceStub(channel).LogDensity.with_call(
        log_density(tol=1e-4), timeout=60, metadata=[("traceparent", TRACEPARENT), ("x-request-id", "req-42")]
    )
    spans = spans_of(exporter, "LogDensity", 6)
    root = spans["LogDensity"]
    assert {f"{span.context.trace_id:032x}" for span in spans.values()} == {TRACE}
    assert root.parent is not None and root.parent.is_remote and root.parent.span_id == int(PARENT, 16)
    for name in STAGES:
        assert spans[name].parent.span_id == root.context.span_id, name
    assert spans["join"].parent.span_id == spans["solve"].context.span_id

    # The stages follow each other inside the call; the join is the solve's first step.
    receive, queue, solve, join, reply = (spans[name] for name in ("receive", "queue", "solve", "join", "response"))
    assert root.start_time <= receive.start_time <= receive.end_time == queue.start_time
    assert queue.end_time == solve.start_time == join.start_time < join.end_time < solve.end_time
    assert solve.end_time == reply.start_time <= reply.end_time <= root.end_time
    assert solve.end_time - solve.start_time >= 0.5 * response.timing.compute_seconds * 1e9

    assert root.attributes["odeserve.request_id"] == "req-42" and trailing(call)["x-request-id"] == "req-42"
    assert root.attributes["odeserve.code"] == "OK" and root.attributes["odeserve.model"] == DENSITY
    attributes = solve.attributes
    assert attributes["odeserve.model"] == DENSITY and attributes["odeserve.items"] == len(POINTS)
    assert attributes["odeserve.rtol"] == attributes["odeserve.atol"] == 1e-4 == response.solved.rtol
    assert attributes["odeserve.method"] == response.solved.method == root.attributes["odeserve.method"]
    assert attributes["odeserve.precision"] == response.solved.precision == root.attributes["odeserve.precision"]
    assert attributes["odeserve.nfe"] == sum(response.items.nfe) and attributes["odeserve.nfe_max"] == max(
        response.items.nfe
    )
    assert 0 < attributes["odeserve.steps_max"] <= attributes["odeserve.steps"] < attributes["odeserve.nfe"]
    assert attributes["odeserve.failed_items"] == 0


def test_a_tighter_tolerance_shows_in_the_solves_attributes(channel, exporter):
    stub = pb_grpc.InferenceStub(channel)
    costs = {}
    for tol in (1e-2, 1e-6):
        exporter.clear()
        stub.LogDensity(log_density(tol=tol), timeout=60)
        solve = spans_of(exporter, "LogDensity", 6)["solve"]
        assert solve.attributes["odeserve.rtol"] == tol
        costs[tol] = (solve.attributes["odeserve.nfe"], solve.attributes["odeserve.steps"])
    assert costs[1e-6][0] > costs[1e-2][0] and costs[1e-6][1] > costs[1e-2][1]


def test_the_open_inference_id_names_the_request_and_a_call_without_traceparent_starts_a_trace(channel, exporter):
    request = oip.ModelInferRequest(model_name=DENSITY, id="oip-7")
    request.inputs.add(name="points", datatype="FP32", shape=POINTS.shape)
    request.raw_input_contents.append(POINTS.tobytes())
    response, call = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
        request, timeout=60, metadata=[("x-request-id", "from-a-header")]
    )
    spans = spans_of(exporter, "ModelInfer", 6)
    root = spans["ModelInfer"]
    assert root.parent is None and root.attributes["odeserve.request_id"] == "oip-7"
    assert response.id == "oip-7" and trailing(call)["x-request-id"] == "oip-7"
    assert len({span.context.trace_id for span in spans.values()}) == 1


def test_a_traceparent_and_request_id_over_http_reach_the_rest_calls_spans(traced, exporter):
    import http.client
    import json

    exporter.clear()
    body = {
        "inputs": [{"name": "points", "shape": list(POINTS.shape), "datatype": "FP32", "data": POINTS.ravel().tolist()}]
    }
    connection = http.client.HTTPConnection("127.0.0.1", traced.server.rest.port, timeout=60)
    connection.request(
        "POST",
        f"/v2/models/{DENSITY}/infer",
        body=json.dumps(body),
        headers={"Traceparent": TRACEPARENT, "X-Request-Id": "rest-9"},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("X-Request-Id") == "rest-9"
    response.read()
    connection.close()
    spans = spans_of(exporter, "ModelInfer", 6)
    root = spans["ModelInfer"]
    assert {f"{span.context.trace_id:032x}" for span in spans.values()} == {TRACE}
    assert root.parent is not None and root.parent.span_id == int(PARENT, 16)
    assert root.attributes["odeserve.request_id"] == "rest-9"


def test_a_refused_call_is_one_span_with_its_code_and_a_generated_request_id(channel, exporter):
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.InferenceStub(channel).LogDensity(
            log_density(model="no-such-model"), timeout=60, metadata=[("x-request-id", "x" * 300)]
        )
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    root = spans_of(exporter, "LogDensity", 1)["LogDensity"]
    assert root.attributes["odeserve.code"] == "NOT_FOUND" and root.attributes["odeserve.model"] == "unknown"
    assert root.status.status_code is StatusCode.UNSET  # a client's mistake is no server error
    generated = trailing(refused.value)["x-request-id"]  # too long to take: one of the server's own
    assert root.attributes["odeserve.request_id"] == generated and len(generated) == 32


def test_every_log_line_about_a_call_names_its_request_and_trace(channel, caplog):
    context = RequestContext()
    caplog.handler.addFilter(context)
    try:
        with caplog.at_level(logging.DEBUG, logger="server"):
            pb_grpc.InferenceStub(channel).LogDensity(
                log_density(), timeout=60, metadata=[("traceparent", TRACEPARENT), ("x-request-id", "log-me")]
            )
            logging.getLogger("server.test").info("not about a call")
    finally:
        caplog.handler.removeFilter(context)
    about = [record for record in caplog.records if record.name == "server.calls"]
    assert about and about[0].getMessage().startswith("LogDensity OK in ")
    assert all(record.request_id == "log-me" and record.trace_id == TRACE for record in about)
    outside = next(record for record in caplog.records if record.name == "server.test")
    assert outside.request_id is None and outside.trace_id is None

    line = json.loads(JsonFormatter().format(about[0]))
    assert line["request_id"] == "log-me" and line["trace_id"] == TRACE and line["level"] == "DEBUG"
    assert line["logger"] == "server.calls" and line["message"].startswith("LogDensity OK") and "T" in line["time"]
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
    assert TextFormatter().format(about[0]).endswith(f" request_id=log-me trace_id={TRACE}")


def test_json_logs_are_one_object_per_line_with_the_request_id(density_only, tmp_path):
    running = start_server(density_only, tmp_path, "--log-format", "json", "--log-level", "DEBUG")
    try:
        with grpc.insecure_channel(running.target) as channel:
            pb_grpc.InferenceStub(channel).LogDensity(
                log_density(), timeout=60, metadata=[("x-request-id", 'quote" and\\ slash')]
            )
    finally:
        assert running.stop() == 0
    lines = [json.loads(line) for line in running.log.read_text().splitlines()]  # every line parses
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    call = [line for line in lines if line.get("request_id") == 'quote" and\\ slash']
    assert [line["message"].split(" in ")[0] for line in call] == ["LogDensity OK"]
    assert "trace_id" not in call[0]  # tracing is off


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's OTLP/gRPC trace endpoint, keeping what it is sent."""

    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):
        self.spans += [
            span for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans
        ]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_sends_the_spans_to_a_collector(density_only, tmp_path):
    collector, server = Collector(), grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        running = start_server(density_only, tmp_path, "--otlp-endpoint", f"http://127.0.0.1:{port}")
        try:
            with grpc.insecure_channel(running.target) as channel:
                pb_grpc.InferenceStub(channel).LogDensity(
                    log_density(), timeout=60, metadata=[("traceparent", TRACEPARENT)]
                )
        finally:
            assert running.stop() == 0  # sends what is batched before it exits
    finally:
        server.stop(None)
    names = sorted(span.name for span in collector.spans if span.trace_id.hex() == TRACE)
    assert names == sorted(["LogDensity", "join", *STAGES])


def test_an_otlp_endpoint_without_opentelemetry_installed_is_one_line(density_only):
    code = "import sys; sys.modules['opentelemetry'] = None; from server.app import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--checkpoints", str(density_only), "--otlp-endpoint", "http://127.0.0.1:4317"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "--otlp-endpoint http://127.0.0.1:4317: tracing needs OpenTelemetry (opentelemetry is not installed): "
        "pip install 'odeserve[tracing]', or leave otlp_endpoint empty"
    )


OFF = """
import asyncio, json, sys, threading
import grpc, numpy as np
from odeserve.v1 import odeserve_pb2 as pb, odeserve_pb2_grpc as pb_grpc
from server.app import Server
from server.config import ServerConfig

async def main():
    server = Server(ServerConfig(checkpoints=sys.argv[1], port=0, metrics_port=0, http_port=0, grace_seconds=1))
    await server.start()
    points = np.zeros((1, 2), np.float32)
    request = pb.LogDensityRequest(model=sys.argv[2], points=pb.Tensor(dtype="float32", shape=[1, 2], data=points.tobytes()))

    def call():
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            return pb_grpc.InferenceStub(channel).LogDensity.with_call(request, timeout=60, metadata=[("traceparent", sys.argv[3])])

    response, answer = await asyncio.to_thread(call)
    await server.stop()
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
    print(json.dumps({"nfe": list(response.items.nfe), "request_id": dict(answer.trailing_metadata())["x-request-id"], "loaded": loaded}))

asyncio.run(main())
"""


def test_with_tracing_off_opentelemetry_is_never_imported(density_only):
    result = subprocess.run(
        [sys.executable, "-c", OFF, str(density_only), DENSITY, TRACEPARENT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["loaded"] == [] and outcome["nfe"][0] > 0 and len(outcome["request_id"]) == 32
