"""What tracing and request ids cost per call, side by side in one run.

Three servers on the same checkpoints, all sent the same ``traceparent`` header:

- ``before``: the server at ``--before`` (default: the commit where main last met this branch),
  extracted with ``git archive``: no request ids, no tracing;
- ``off``: this tree with tracing off (the default): request ids and the trailing
  ``x-request-id``, OpenTelemetry never imported;
- ``on``: this tree with ``--otlp-endpoint`` at a collector run in this process (every call
  sampled, spans batched and sent over OTLP/gRPC as in production).

Two workloads per server, N closed-loop clients each: Open Inference ``ServerLive`` (no model:
the per-call path alone) and ``LogDensity`` of one point at tol 1e-2 on cnf-8gaussians (a short
solve). Rounds are interleaved (the order rotates); per configuration the median over rounds
of throughput and of median latency, and the ratios off/before and on/off.

Then, in this process, what ``CallRunner.run`` itself spends on a call whose body does
nothing (median of 5 interleaved batches of 20,000 calls, µs per call): ``server/calls.py`` of
``--before``; tracing off; off with a ``traceparent`` and ``x-request-id`` header; on, every call
sampled, its one root span handed to an exporter that drops it.

    python bench/tracing_overhead.py [--rounds 5] [--seconds 3] [--clients 4]

Writes ``bench/results/tracing_overhead_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from odeserve.v1 import odeserve_pb2 as pb  # noqa: E402
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc  # noqa: E402
from server.oip import grpc_predict_v2_pb2 as oip  # noqa: E402
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc  # noqa: E402

DENSITY = "cnf-8gaussians"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
POINT = np.array([[0.5, -0.5]], dtype=np.float32)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def calls(channel: grpc.Channel) -> dict:
    metadata = [("traceparent", TRACEPARENT)]
    live = oip_grpc.GRPCInferenceServiceStub(channel).ServerLive
    density = pb_grpc.InferenceStub(channel).LogDensity
    request = pb.LogDensityRequest(
        model=DENSITY,
        points=pb.Tensor(dtype="float32", shape=list(POINT.shape), data=POINT.tobytes()),
        accuracy=pb.Accuracy(tol=1e-2),
    )
    return {
        "server_live": lambda: live(oip.ServerLiveRequest(), timeout=30, metadata=metadata),
        "log_density": lambda: density(request, timeout=30, metadata=metadata),
    }


def closed_loop(target: str, workload: str, clients: int, seconds: float) -> dict:
    """``clients`` threads calling back to back for ``seconds``: calls/s and latency."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    end = [0.0]

    def client(index: int) -> None:
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = calls(channel)[workload]
            call()  # connected and warm
            start.wait()
            while time.monotonic() < end[0]:
                begin = time.monotonic()
                call()
                latencies[index].append(time.monotonic() - begin)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    end[0] = time.monotonic() + 3600
    start.wait()
    end[0] = time.monotonic() + seconds
    for thread in threads:
        thread.join()
    every = [latency for own in latencies for latency in own]
    return {
        "calls_per_s": len(every) / seconds,
        "median_ms": statistics.median(every) * 1000,
        "p90_ms": float(np.percentile(every, 90)) * 1000,
    }


def call_runner_cost(before: str, calls: int = 20_000, batches: int = 5) -> dict[str, float]:
    """Microseconds ``CallRunner.run`` spends per call around a body that does nothing; ``before``:
    also the ``server/calls.py`` of that revision (over today's other modules)."""
    import asyncio
    import types

    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from server.api import Caller
    from server.calls import CallRunner
    from server.service import ByteBudget
    from server.stats import discard
    from server.tracing import Tracing, tracer_provider

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    headers = {"traceparent": TRACEPARENT, "x-request-id": "bench-1"}
    old = types.ModuleType("server.calls_before")
    old.__package__ = "server"
    sys.modules[old.__name__] = old
    source = subprocess.check_output(["git", "show", f"{before}:server/calls.py"], cwd=ROOT, text=True)
    exec(compile(source, "calls_before.py", "exec"), old.__dict__)
    runners = {
        "before": (old.CallRunner(ByteBudget(1 << 30), discard), None),
        "off": (CallRunner(ByteBudget(1 << 30), discard), {}),
        "off_with_headers": (CallRunner(ByteBudget(1 << 30), discard), headers),
        "on": (CallRunner(ByteBudget(1 << 30), discard, Tracing(provider)), headers),
    }

    async def body(call) -> None:
        return None

    async def batch(runner, given: dict | None) -> float:
        extra = {} if given is None else {"headers": given}  # the revision before takes no headers
        begin = time.perf_counter()
        for _ in range(calls):
            await runner.run("Bench", body, remaining=lambda: None, caller=Caller, **extra)
        return (time.perf_counter() - begin) / calls * 1e6

    async def measure() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(batches):
            for name, (runner, given) in runners.items():
                times[name].append(await batch(runner, given))
        return times

    return {name: statistics.median(values) for name, values in asyncio.run(measure()).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--before", default="", help="git revision of the baseline (default: merge-base with main)")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    args = parser.parse_args()
    from live_server import end_on_sigterm, start_server

    end_on_sigterm()

    before = args.before or subprocess.check_output(["git", "merge-base", "HEAD", "main"], cwd=ROOT, text=True).strip()
    collector, otlp = Collector(), grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = folder / "checkpoints"
        checkpoints.mkdir()
        shutil.copy(args.checkpoints / f"{DENSITY}.pt", checkpoints)
        old = folder / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", before], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        run_old = f"import sys; sys.path[:0] = [{str(old)!r}, {str(old / 'client')!r}]; from server.app import main; sys.exit(main())"
        servers = {}
        try:
            for name, flags, python in (
                ("before", (), ("-c", run_old)),
                ("off", (), ("-m", "server")),
                ("on", ("--otlp-endpoint", f"http://127.0.0.1:{otlp_port}"), ("-m", "server")),
            ):
                (folder / name).mkdir(exist_ok=True)
                servers[name] = start_server(checkpoints, folder / name, *flags, python=python)
            rounds: dict[str, dict[str, list[dict]]] = {
                w: {n: [] for n in servers} for w in ("server_live", "log_density")
            }
            names = list(servers)
            for index in range(args.rounds):
                order = names[index % len(names) :] + names[: index % len(names)]
                for workload in rounds:
                    for name in order:
                        figures = closed_loop(servers[name].target, workload, args.clients, args.seconds)
                        rounds[workload][name].append(figures)
                        print(f"round {index} {workload:11s} {name:6s} {figures}", flush=True)
        finally:
            for running in servers.values():
                running.stop()
    otlp.stop(None)
    runner_us = call_runner_cost(before)
    print("CallRunner.run, us per call:", json.dumps(runner_us))

    summary: dict = {}
    for workload, by_name in rounds.items():
        medians = {
            name: {key: statistics.median(r[key] for r in figures) for key in figures[0]}
            for name, figures in by_name.items()
        }
        summary[workload] = {
            "medians": medians,
            "ratios": {
                "off/before calls_per_s": medians["off"]["calls_per_s"] / medians["before"]["calls_per_s"],
                "off/before median_ms": medians["off"]["median_ms"] / medians["before"]["median_ms"],
                "on/off calls_per_s": medians["on"]["calls_per_s"] / medians["off"]["calls_per_s"],
                "on/off median_ms": medians["on"]["median_ms"] / medians["off"]["median_ms"],
            },
            "rounds": by_name,
        }
        print(workload, json.dumps(summary[workload]["ratios"], indent=1))
    result = {
        "benchmark": "tracing_overhead",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/tracing_overhead.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "checkpoints": os.path.relpath(args.checkpoints, ROOT), "before": before},
        "load_average_1m": os.getloadavg()[0],
        "spans_received_by_collector": collector.spans,
        "call_runner_us_per_call": runner_us,
        **summary,
    }
    out = ROOT / "bench" / "results" / "tracing_overhead_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
