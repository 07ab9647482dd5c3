"""Prometheus metrics, fed from the engine's and servicer's plain stats. The only module that
imports prometheus_client. Names follow Prometheus conventions (base units, ``_total``,
``_seconds``); labels are model, method, precision, rpc, code/status, never a tolerance value."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .httpd import Limits, application
from .stats import (
    CompileStats,
    ItemStats,
    IterationStats,
    QueueStats,
    RequestEndStats,
    RequestStats,
    Stats,
    StepStats,
    WarmUpStats,
    WorkerStats,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NFE_BUCKETS = tuple(float(2**k) for k in range(1, 15))  # 2 .. 16384 function evaluations
TOLERANCE_BUCKETS = tuple(10.0**k for k in range(-8, 1))  # the decades a card's table spans


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "odeserve_requests_total",
            "Finished RPCs by gRPC status code.",
            ["model", "method", "precision", "rpc", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "odeserve_request_latency_seconds",
            "Server-side RPC latency.",
            ["model", "method", "precision", "rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "odeserve_queue_wait_seconds",
            "Time a request waited for a batch slot, by priority level.",
            ["model", "method", "precision", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "odeserve_compute_seconds",
            "Time from a request's first item joining a batch to its last finishing.",
            ["model", "method", "precision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.nfe = Histogram(
            "odeserve_item_nfe",
            "Function evaluations per item.",
            ["model", "method", "precision"],
            buckets=NFE_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "odeserve_items_total",
            "Items that left the batch, by solve status.",
            ["model", "method", "precision", "status"],
            registry=r,
        )
        self.steps = Counter(
            "odeserve_solver_steps_total",
            "Solver steps attempted, summed over the rows of the batch.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.rejected = Counter(
            "odeserve_rejected_steps_total",
            "Row-steps rejected by error control.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.batch_steps = Counter(
            "odeserve_batch_steps_total",
            "Solver steps over a running batch.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.batch_size = Gauge(
            "odeserve_running_batch_size",
            "Rows in the running batch at the last step.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.occupancy = Gauge(
            "odeserve_batch_occupancy_ratio",
            "Running batch size over the batch limit.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.queued = Gauge("odeserve_queued_items", "Items waiting for a batch slot.", ["model"], registry=r)
        self.queue_capacity = Gauge(
            "odeserve_queue_capacity_items",
            "Most items a model's queue takes (beyond: RESOURCE_EXHAUSTED).",
            ["model"],
            registry=r,
        )
        self.expected_nfe = Counter(
            "odeserve_item_expected_nfe_total",
            "The model card's NFE for the items served (at their tolerance, for the card's solver); "
            "compare with odeserve_item_nfe_sum to see drift.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.running = Gauge("odeserve_running_items", "Items in the running batch.", ["model"], registry=r)
        self.preemptions = Counter(
            "odeserve_preemptions_total",
            "Items parked to give other requests their share of the batch.",
            ["model", "method", "precision"],
            registry=r,
        )
        self.budget_exhausted = Counter(
            "odeserve_budget_exhausted_total",
            "Requests refused or stopped because their NFE budget could not pay for them.",
            ["model"],
            registry=r,
        )
        self.restarts = Counter(
            "odeserve_worker_restarts_total", "Model workers restarted after a crash.", ["model"], registry=r
        )
        self.compiles = Counter(
            "odeserve_dynamics_compiles_total",
            "Padded batch sizes f was compiled for (compile_dynamics), by which f measured faster and is used.",
            ["model", "precision", "used"],
            registry=r,
        )
        self.compile_seconds = Counter(
            "odeserve_dynamics_compile_seconds_total",
            "Time spent compiling f (compile_dynamics).",
            ["model"],
            registry=r,
        )
        self.warmup = Gauge(
            "odeserve_warmup_seconds",
            "How long the served version's warm-up solves took before it was served (absent: none ran).",
            ["model"],
            registry=r,
        )
        self.engine_seconds = Counter(
            "odeserve_engine_seconds_total",
            "Worker busy time by phase: f, the model outside the ODE, the solver's own arithmetic (step), "
            "the scheduler (schedule, update) and the batch's row changes (join, resume, park, drop, leave).",
            ["model", "phase"],
            registry=r,
        )
        self.row_moves = Counter(
            "odeserve_engine_row_moves_total",
            "Rows the engine moved between steps: items joining, resumed, parked, dropped.",
            ["model", "move"],
            registry=r,
        )
        self.auto_tol = Histogram(
            "odeserve_auto_tolerance",
            "Tolerance chosen for auto_tol requests.",
            ["model"],
            buckets=TOLERANCE_BUCKETS,
            registry=r,
        )

        self._stepped: dict[str, set[tuple[str, str]]] = {}  # model -> (method, precision) with batch gauges

    def __call__(self, stats: Stats) -> None:
        if isinstance(stats, StepStats):
            self._stepped.setdefault(stats.model, set()).add((stats.method, stats.precision))
            self.batch_steps.labels(stats.model, stats.method, stats.precision).inc()
            self.steps.labels(stats.model, stats.method, stats.precision).inc(stats.batch_size)
            self.rejected.labels(stats.model, stats.method, stats.precision).inc(stats.rejected)
            self.batch_size.labels(stats.model, stats.method, stats.precision).set(stats.batch_size)
            self.occupancy.labels(stats.model, stats.method, stats.precision).set(stats.batch_size / stats.max_batch)
            if stats.preempted:
                self.preemptions.labels(stats.model, stats.method, stats.precision).inc(stats.preempted)
        elif isinstance(stats, IterationStats):
            for phase, seconds in stats.seconds:
                self.engine_seconds.labels(stats.model, phase).inc(seconds)
            for move in ("joined", "resumed", "parked", "dropped"):
                if count := getattr(stats, move):
                    self.row_moves.labels(stats.model, move).inc(count)
        elif isinstance(stats, ItemStats):
            histogram = self.nfe.labels(stats.model, stats.method, stats.precision)
            for nfe, status in zip(stats.nfe, stats.statuses):
                histogram.observe(nfe)
                self.items.labels(stats.model, stats.method, stats.precision, status).inc()
        elif isinstance(stats, QueueStats):
            self.queued.labels(stats.model).set(stats.queued)
            self.running.labels(stats.model).set(stats.running)
            self.queue_capacity.labels(stats.model).set(stats.capacity)
            if stats.running == 0:  # an idle model's batch is empty, not the size of its last step
                for group in self._stepped.get(stats.model, ()):
                    self.batch_size.labels(stats.model, *group).set(0)
                    self.occupancy.labels(stats.model, *group).set(0)
        elif isinstance(stats, RequestStats):
            self.requests.labels(stats.model, stats.method, stats.precision, stats.rpc, stats.code).inc()
            self.latency.labels(stats.model, stats.method, stats.precision, stats.rpc).observe(stats.latency_seconds)
            if stats.queue_seconds is not None:
                self.queue_wait.labels(stats.model, stats.method, stats.precision, str(stats.priority)).observe(
                    stats.queue_seconds
                )
            if stats.auto_tol is not None:
                self.auto_tol.labels(stats.model).observe(stats.auto_tol)
            if stats.compute_seconds is not None:
                self.compute.labels(stats.model, stats.method, stats.precision).observe(stats.compute_seconds)
            if stats.expected_nfe is not None:
                self.expected_nfe.labels(stats.model, stats.method, stats.precision).inc(stats.expected_nfe)

        elif isinstance(stats, RequestEndStats):
            self.budget_exhausted.labels(stats.model).inc()
        elif isinstance(stats, WorkerStats):
            self.restarts.labels(stats.model).inc()
        elif isinstance(stats, WarmUpStats):
            self.warmup.labels(stats.model).set(stats.seconds)
        elif isinstance(stats, CompileStats):
            used = "compiled" if stats.kept else "eager"
            self.compiles.labels(stats.model, stats.precision, used).inc()
            self.compile_seconds.labels(stats.model).inc(stats.seconds)

    def application(self, limits: Limits) -> web.Application:
        """``GET /metrics`` (and ``/``) in the exposition format, on its own port."""

        async def exposition(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def elsewhere(request: web.Request, status: int) -> web.Response:
            return web.Response(status=status, text="only GET /metrics\n" if status == 405 else "see /metrics\n")

        app = application(limits, elsewhere)
        app.router.add_get("/metrics", exposition)
        app.router.add_get("/", exposition)
        return app
