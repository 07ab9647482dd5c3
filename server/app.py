"""Wiring and lifecycle: load checkpoints, start the engine, gRPC (with health, reflection,
TLS and token auth) and /metrics; reload checkpoints on SIGHUP; drain gracefully on SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from neuralode.devices import resolve_device
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

from .auth import TokenAuth, accepted_tokens, server_credentials
from .config import ServerConfig, parse_config
from .engine import Engine
from .metrics import Metrics
from .models import ServedModel, load_models
from .servicer import InferenceServicer
from .wire import auto_tolerances

log = logging.getLogger("server")


class Server:
    """A running odeserve: ``start()``, ``reload()`` the checkpoints at will, then ``stop()``
    (``main`` wires these to the process start, SIGHUP and SIGTERM)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.models = load_models(config.checkpoints, self.device)
        if not self.models:
            log.warning("no servable checkpoints in %s", config.checkpoints)
        self.metrics = Metrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.engine = Engine(
            self.device,
            max_batch=config.max_batch,
            max_queued=config.max_queued_items,
            policy="static" if config.batching == "static" else config.policy,
            max_delay=config.max_delay_ms / 1000,
            default_priority=config.default_priority,
            stats=self.metrics,
            health=self._model_health,
        )
        for model in self.models.values():
            self._add_worker(model)
        self.servicer = InferenceServicer(self.models, self.engine, config, self.metrics)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        if config.max_connection_age_s > 0:  # a GOAWAY after this; calls in flight get the grace period to finish
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]  # fmt: skip
        try:
            tokens, credentials = accepted_tokens(config), server_credentials(config)
        except OSError as error:
            raise SystemExit(f"cannot read {error.filename}: {error.strerror}") from None
        interceptors = [TokenAuth(tokens, self.metrics)] if tokens else []
        executor = futures.ThreadPoolExecutor(config.grpc_threads, thread_name_prefix="rpc")
        self.grpc = grpc.server(executor, options=options, interceptors=interceptors)
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        service_names = (
            pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, self.grpc)
        address = f"{config.host}:{config.port}"
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {address}")
        self.security = ("mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext") + (
            f", {len(tokens)} bearer token(s)" if tokens else ""
        )
        self._reload_lock = threading.Lock()
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    def _add_worker(self, model: ServedModel) -> None:
        self.engine.add(model.key, model.adapter, label=model.name, expected_nfe=model.expected_nfe,
                        tolerances=auto_tolerances(model, self.config))  # fmt: skip

    def _model_health(self, name: str, serving: bool) -> None:
        """A model's worker is recovering from a crash (``serving=False``) or back."""
        if name in self.models:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            self.health.set(name, status)

    def start(self) -> None:
        self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        self.grpc.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        self.health.set("", serving)
        self.health.set(pb.DESCRIPTOR.services_by_name["Inference"].full_name, serving)
        for name in self.models:
            self.health.set(name, serving)
        log.info("serving %d models on %s:%d (gRPC, %s), metrics on %s:%d", len(self.models), self.config.host, self.port,
                 self.security, self.config.metrics_host, self.metrics_port)  # fmt: skip
        print(f"odeserve ready grpc={self.config.host}:{self.port} metrics={self.config.metrics_host}:{self.metrics_port}",
              flush=True)  # fmt: skip

    def reload(self) -> None:
        """Re-read the checkpoints folder without downtime: new and changed files get new
        workers, requests already accepted finish on the weights they started with, and a
        file that no longer loads keeps its previous version serving."""
        with self._reload_lock:
            old = self.models
            fresh = load_models(self.config.checkpoints, self.device, previous=old)
            for model in fresh.values():
                if old.get(model.name) is not model:
                    self._add_worker(model)
            self.models = self.servicer.models = fresh
            for model in old.values():
                if fresh.get(model.name) is not model:
                    self.engine.retire(model.key)
            serving, gone = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            for name in fresh:
                self.health.set(name, serving)
            for name in old.keys() - fresh.keys():
                self.health.set(name, gone)
            changed = sorted(name for name in fresh if old.get(name) is not fresh[name])
            log.info("reloaded %s: %d models, new or changed: %s, removed: %s", self.config.checkpoints, len(fresh),
                     ", ".join(changed) or "none", ", ".join(sorted(old.keys() - fresh.keys())) or "none")  # fmt: skip

    def stop(self) -> None:
        """Drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish within the
        grace period; then close."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_seconds
        log.info("draining (grace %.0f s)", grace)
        self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        end = time.monotonic() + grace
        while not self.engine.idle and time.monotonic() < end:
            time.sleep(0.02)
        self.engine.close(timeout=max(0.0, end - time.monotonic()))
        self.grpc.stop(grace=max(0.0, end - time.monotonic())).wait()
        self._stopped.set()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("settings: %s", config.as_dict())
    server = Server(config)
    stop, reload = threading.Event(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    server.start()
    while not stop.wait(0.2):
        if reload.is_set():
            reload.clear()
            server.reload()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
