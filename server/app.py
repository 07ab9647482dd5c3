"""Wiring and lifecycle: load checkpoints, start the engine, warm each model up, start the
asyncio gRPC front end (with health, reflection, TLS and token auth), the REST API and /metrics
over HTTP; reload checkpoints on SIGHUP (warming new versions before they serve); drain
gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from neuralode.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, keep_freed_memory
from neuralode.devices import resolve_device

from . import logs
from .calls import CallTracer
from .config import ServerConfig, parse_config
from .engine import Engine
from .frontend import Frontend
from .health import Health
from .httpd import HttpServer, Limits, tls_context
from .metrics import Metrics
from .models import ServedModel, load_models
from .open_inference import SERVICE as OIP_SERVICE
from .open_inference import OpenInference
from .rest import RestApi
from .service import InferenceService
from .stats import WarmUpStats
from .v1 import SERVICE as V1_SERVICE
from .v1 import V1
from .validation import auto_tolerances
from .warmup import WarmUpFailed, warm_up

log = logging.getLogger("server")

EXIT_STUCK = 3  # the exit status when a model's step did not end after the grace period
_ANSWER_SECONDS = 1.0  # past the grace period, for stopped requests' calls to be answered

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """A running odeserve: ``await start()``, ``await reload()`` the checkpoints at will, then
    ``await stop()`` (``main`` wires these to the process start, SIGHUP and SIGTERM)."""

    def __init__(self, config: ServerConfig, tracer: CallTracer | None = None) -> None:
        """``tracer``: where calls are traced; by default as ``otlp_endpoint`` says (none when
        it is empty)."""
        self.config = config
        self.tracer = tracer if tracer is not None else configured_tracer(config)
        if config.reuse_port == "off":
            _refuse_busy(config.host, config.port, "--port")
        _refuse_busy(config.metrics_host, config.metrics_port, "--metrics-port")
        if config.http_port >= 0:
            _refuse_busy(config.http_host, config.http_port, "--http-port")
        if not Path(config.checkpoints).is_dir():
            raise SystemExit(
                f"--checkpoints {config.checkpoints}: not a folder (a folder of *.pt checkpoints is "
                "served); no models to serve"
            )
        self.device = resolve_device(config.device)
        self.models = load_models(config.checkpoints, self.device)
        if not self.models:
            raise SystemExit(
                f"--checkpoints {config.checkpoints}: no servable *.pt checkpoints (each file's "
                "reason is logged above); no models to serve"
            )
        self.metrics = Metrics()
        self.health = Health(("", V1_SERVICE, OIP_SERVICE))  # a model's entry needs a token when tokens are set
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine = Engine(self.device, config.engine(), stats=self.metrics, health=self._model_health)
        for model in self.models.values():
            self._add_worker(model)
        self.service = InferenceService(self.models, self.engine, config)
        open_inference = OpenInference(self.service, version=_version())
        rpcs = [*V1(self.service).rpcs(), *open_inference.rpcs()]
        try:
            self.frontend = Frontend(config, self.service, rpcs, self.metrics, self._standard_services, self.tracer)
        except OSError as error:
            raise SystemExit(f"cannot read {error.filename}: {error.strerror}") from None
        except ValueError as error:  # a malformed token grant
            raise SystemExit(str(error)) from None
        self.health.tokens = self.frontend.accepted
        address = f"{config.host}:{config.port}"
        try:
            self.port = self.frontend.listen(address)
        except RuntimeError:  # gRPC's "Failed to bind": taken meanwhile, or not an address of this host
            self.port = 0
        if self.port == 0:
            raise SystemExit(
                f"cannot listen on {address} (in use, or not an address of this host); "
                "choose another with --port (0: any free port) or --host"
            )
        security = "mutual TLS" if config.tls_client_ca else "TLS" if self.frontend.credentials else "plaintext"
        self.security = security + (f", {self.frontend.tokens} bearer token(s)" if self.frontend.tokens else "")
        metrics_limits = Limits(
            max_connections=config.metrics_max_connections,
            head_timeout_s=config.metrics_read_timeout_s,
            idle_timeout_s=config.metrics_read_timeout_s,
            max_body_bytes=1024,
        )
        self.metrics_http = HttpServer(self.metrics.application(metrics_limits))
        self.rest: HttpServer | None = None
        if config.http_port >= 0:
            api = RestApi(config, open_inference, self.frontend.calls, self.frontend.accepted)
            self.rest = HttpServer(api.application())
        self.tls = tls_context(config)
        self._reload_lock = asyncio.Lock()
        self._stopped = False

    def _standard_services(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            V1_SERVICE,
            OIP_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)

    def _add_worker(self, model: ServedModel) -> None:
        self.engine.add(
            model.key,
            model.adapter,
            label=model.name,
            expected_nfe=model.expected_nfe,
            tolerances=auto_tolerances(model, self.config),
        )

    def _warmed(self, models: dict[str, ServedModel], previous: dict[str, ServedModel]) -> dict[str, ServedModel]:
        """``models`` once each version not in ``previous`` has warmed up on its worker (with
        ``warmup`` on). A version whose warm-up fails is not served, as a checkpoint that does
        not load is not: its worker retires and its previous version, if any, keeps serving.
        Blocking: run it in a thread."""
        served = {}
        for name, model in models.items():
            old = previous.get(name)
            if model is old or self.config.warmup == "off":
                served[name] = model
                continue
            log.info("warming %s (version %s) up", name, model.version)
            try:
                warm = warm_up(self.engine, model, self.config)
            except WarmUpFailed as error:
                self.engine.retire(model.key)
                if old is None:
                    log.error("not serving %s: its warm-up failed: %s", name, error)
                else:
                    log.error(
                        "not reloading %s: its warm-up failed: %s; still serving version %s", name, error, old.version
                    )
                    served[name] = old
                continue
            self.metrics(WarmUpStats(name, warm.seconds))
            log.info(
                "warmed %s (version %s) up in %.2f s: %d solves", name, model.version, warm.seconds, len(warm.solves)
            )
            if warm.limited:
                log.warning("%s: warm-up solves stopped by a limit: %s", name, "; ".join(warm.limited))
            served[name] = model
        return served

    def _model_health(self, name: str, serving: bool) -> None:
        """From a worker thread: its model is recovering from a crash, or back."""
        if self.loop is not None and name in self.models:
            asyncio.run_coroutine_threadsafe(self.health.set(name, SERVING if serving else NOT_SERVING), self.loop)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        config = self.config
        self.metrics_port = await _listen(self.metrics_http, config.metrics_host, config.metrics_port, "/metrics")
        self.models = self.service.models = await asyncio.to_thread(self._warmed, self.models, {})
        if not self.models:
            raise SystemExit("no model passed its warm-up (each one's reason is logged above); no models to serve")
        if self.rest is not None:  # after the warm-up, as gRPC: its readiness says the models are warm
            await _listen(self.rest, config.http_host, config.http_port, "HTTP", self.tls)
        await self.frontend.server.start()
        for name in ("", V1_SERVICE, OIP_SERVICE, *self.models):
            await self.health.set(name, SERVING)
        http = "off" if self.rest is None else f"{config.http_host}:{self.rest.port}"
        log.info(
            "serving %d models on %s:%d (gRPC, %s), HTTP on %s, metrics on %s:%d",
            len(self.models),
            config.host,
            self.port,
            self.security,
            http,
            config.metrics_host,
            self.metrics_port,
        )
        print(
            f"odeserve ready grpc={config.host}:{self.port} metrics={config.metrics_host}:{self.metrics_port} "
            f"http={http}",
            flush=True,
        )

    async def reload(self) -> None:
        """Re-read the checkpoints folder without downtime: new and changed files get new
        workers, which warm up while the old versions serve, requests already accepted finish
        on the weights they started with, and a file that no longer loads (or warm up) keeps
        its previous version serving."""
        async with self._reload_lock:
            old = self.models
            fresh = await asyncio.to_thread(load_models, self.config.checkpoints, self.device, previous=old)
            for model in fresh.values():
                if old.get(model.name) is not model:
                    self._add_worker(model)
            fresh = await asyncio.to_thread(self._warmed, fresh, old)
            self.models = self.service.models = fresh
            for model in old.values():
                if fresh.get(model.name) is not model:
                    self.engine.retire(model.key)
            for name in fresh:
                await self.health.set(name, SERVING)
            for name in old.keys() - fresh.keys():
                await self.health.set(name, NOT_SERVING)
            changed = sorted(name for name in fresh if old.get(name) is not fresh[name])
            log.info(
                "reloaded %s: %d models, new or changed: %s, removed: %s",
                self.config.checkpoints,
                len(fresh),
                ", ".join(changed) or "none",
                ", ".join(sorted(old.keys() - fresh.keys())) or "none",
            )

    async def stop(self) -> bool:
        """Drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish within the
        grace period; what is still running then is stopped (its callers get UNAVAILABLE); then
        close. False when a model's worker did not end its step (the process must exit hard)."""
        if self._stopped:
            return True
        self._stopped = True
        grace = self.config.grace_seconds
        log.info("draining (grace %.0f s)", grace)
        await self.health.enter_graceful_shutdown()
        self.service.draining = True
        end = time.monotonic() + grace
        while not self.engine.idle and time.monotonic() < end:
            await asyncio.sleep(0.02)
        stuck = await asyncio.to_thread(self.engine.close, max(0.0, end - time.monotonic()))
        # The calls of stopped requests are answering now: a moment for that, not a cancel.
        await self.frontend.server.stop(max(_ANSWER_SECONDS, end - time.monotonic()))
        if self.rest is not None:
            await self.rest.stop()
        await self.metrics_http.stop()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)
        if stuck:
            log.error("stopped, but the worker of %s is still inside a step", ", ".join(stuck))
            return False
        log.info("stopped")
        return True


async def _listen(http: HttpServer, host: str, port: int, what: str, tls: ssl.SSLContext | None = None) -> int:
    flag = "--metrics-port" if what == "/metrics" else "--http-port"
    try:
        return await http.start(host, port, tls)
    except OSError as error:
        raise SystemExit(
            f"cannot serve {what} on {host}:{port}: {error.strerror}; choose another with {flag} (0: any free port)"
        ) from None


def _refuse_busy(host: str, port: int, flag: str) -> None:
    """Exit with one line when another process already listens on ``host:port`` (checked before
    anything is loaded; gRPC would otherwise fail later with its own error, or share the port)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise SystemExit(f"cannot listen on {host}:{port}: {error.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as error:
                busy = error.errno == errno.EADDRINUSE
                raise SystemExit(
                    f"cannot listen on {host}:{port}: "
                    f"{'the port is in use (another odeserve?)' if busy else error.strerror}; "
                    f"choose another with {flag} (0: any free port)"
                ) from None


def configured_tracer(config: ServerConfig) -> CallTracer | None:
    """The OTLP tracer ``otlp_endpoint`` asks for; None (and OpenTelemetry never imported)
    when it is empty. Exits with one line when the ``tracing`` extra is not installed."""
    if not config.otlp_endpoint:
        return None
    try:
        from .tracing import Tracing

        return Tracing.otlp(config.otlp_endpoint, config.trace_sample_ratio, _version())
    except ImportError as error:
        if not (error.name or "").startswith("opentelemetry"):
            raise
        raise SystemExit(
            f"--otlp-endpoint {config.otlp_endpoint}: tracing needs OpenTelemetry ({error.name} is not installed): "
            "pip install 'odeserve[tracing]', or leave otlp_endpoint empty"
        ) from None


def _version() -> str:
    try:
        return importlib.metadata.version("odeserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def serve(config: ServerConfig) -> bool:
    server = Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await server.start()
    await stop.wait()
    return await server.stop()


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logs.configure(config.log_level, config.log_format)
    log.info("settings: %s", config.as_dict())
    if config.keep_freed_memory == "on":
        skipped = keep_freed_memory()
        if skipped is None:
            log.info(
                "keep_freed_memory: glibc's malloc serves blocks up to %d MiB from its heaps and keeps up to %d MiB "
                "free at a heap's top",
                MMAP_THRESHOLD >> 20,
                TRIM_THRESHOLD >> 20,
            )
        else:
            log.info("keep_freed_memory: glibc's malloc settings left as they are (%s)", skipped)
    if not asyncio.run(serve(config)):
        # A thread still inside torch would abort the interpreter's exit (SIGABRT): leave now.
        logging.shutdown()
        os._exit(EXIT_STUCK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
