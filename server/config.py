"""Server configuration: defaults < config file (TOML) < ODESERVE_* environment < flags."""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .logs import LOG_FORMATS
from .scheduling import (
    AUTO_HEADROOM,
    CLIENT_QUEUE_SHARE,
    GUARANTEED_SHARE,
    LOWER_LEVEL_SHARE,
    POLICIES,
    SchedulerConfig,
    policy_class,
)

log = logging.getLogger("server.config")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings, passed whole to every model's worker: its scheduler's and
    whether steps replay as CUDA graphs. Built from the server's settings by
    :meth:`ServerConfig.engine`."""

    scheduler: SchedulerConfig = SchedulerConfig()
    step_graphs: bool = False
    compile_dynamics: bool = False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    reuse_port: str = "off"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    checkpoints: Path = Path("checkpoints")
    device: str = "auto"
    policy: str = "fair"
    priority_levels: int = 3
    default_priority: int = 2
    guaranteed_share: float = GUARANTEED_SHARE
    lower_level_share: float = LOWER_LEVEL_SHARE
    client_queue_share: float = CLIENT_QUEUE_SHARE
    auto_headroom: float = AUTO_HEADROOM
    max_batch: int = 256
    step_graphs: str = "off"
    compile_dynamics: str = "off"
    warmup: str = "on"
    bfloat16: str = "native"
    keep_freed_memory: str = "on"
    max_delay_ms: float = 5.0
    max_queued_items: int = 4096
    max_items_per_request: int = 1024
    max_nfe: int = 10_000
    max_request_nfe: int = 1_000_000
    max_abs_input: float = 1e6
    min_tol: float = 1e-8
    max_tol: float = 1.0
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 20.0
    max_connection_age_s: float = 0.0
    max_concurrent_rpcs: int = 4096
    max_concurrent_streams: int = 256
    request_read_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    max_inflight_bytes: int = 256 * 1024 * 1024
    metrics_max_connections: int = 256
    metrics_read_timeout_s: float = 5.0
    http_max_connections: int = 1024
    http_idle_timeout_s: float = 60.0
    log_level: str = "INFO"
    log_format: str = "text"
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    token_file: str = ""
    tokens: str = ""

    def __post_init__(self) -> None:
        problems = []
        try:
            policy_class(self.policy)
        except ValueError as error:
            problems.append(str(error))
        if self.step_graphs not in ("off", "on"):
            problems.append(f"step_graphs must be off or on, got {self.step_graphs!r}")
        if self.warmup not in ("off", "on"):
            problems.append(f"warmup must be off or on, got {self.warmup!r}")
        if self.compile_dynamics not in ("off", "on"):
            problems.append(f"compile_dynamics must be off or on, got {self.compile_dynamics!r}")
        if self.bfloat16 not in ("native", "on", "off"):
            problems.append(f"bfloat16 must be native, on or off, got {self.bfloat16!r}")
        if self.keep_freed_memory not in ("off", "on"):
            problems.append(f"keep_freed_memory must be off or on, got {self.keep_freed_memory!r}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not 0 <= self.trace_sample_ratio <= 1:
            problems.append("trace_sample_ratio must be in [0, 1]")
        if self.reuse_port not in ("off", "on"):
            problems.append(f"reuse_port must be off or on, got {self.reuse_port!r}")
        if not 1 <= self.default_priority <= self.priority_levels:
            problems.append("need 1 <= default_priority <= priority_levels")
        if not 0 <= self.guaranteed_share <= 1:
            problems.append("guaranteed_share must be in [0, 1]")
        if not 0 <= self.lower_level_share < 1:
            problems.append("lower_level_share must be in [0, 1)")
        if not 0 < self.client_queue_share <= 1:
            problems.append("client_queue_share must be in (0, 1]")
        if not 0 < self.auto_headroom <= 1:
            problems.append("auto_headroom must be in (0, 1]")
        if not self.max_abs_input > 0:
            problems.append("max_abs_input must be > 0")
        for name in (
            "max_batch",
            "max_queued_items",
            "max_items_per_request",
            "max_nfe",
            "max_request_nfe",
            "max_message_bytes",
            "max_concurrent_rpcs",
            "max_concurrent_streams",
            "max_inflight_bytes",
            "metrics_max_connections",
            "http_max_connections",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.http_port < -1:
            problems.append("http_port must be a port, 0 (any free one) or -1 (no HTTP endpoint)")
        if not 0 < self.min_tol <= self.max_tol:
            problems.append("need 0 < min_tol <= max_tol")
        if self.max_delay_ms < 0 or self.grace_seconds < 0 or self.max_connection_age_s < 0:
            problems.append("max_delay_ms, grace_seconds and max_connection_age_s must be >= 0")
        timeouts = (
            "request_read_timeout_s",
            "handshake_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "min_client_ping_interval_s",
            "metrics_read_timeout_s",
            "http_idle_timeout_s",
        )
        problems += [f"{name} must be > 0" for name in timeouts if not getattr(self, name) > 0]
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if problems:
            raise ValueError("; ".join(problems))

    def engine(self) -> EngineConfig:
        """The settings the engine and every model's scheduler take, in their own units."""
        scheduler = SchedulerConfig(
            max_batch=self.max_batch,
            max_queued=self.max_queued_items,
            policy=self.policy,
            max_delay=self.max_delay_ms / 1000,
            default_priority=self.default_priority,
            guaranteed_share=self.guaranteed_share,
            lower_level_share=self.lower_level_share,
            client_queue_share=self.client_queue_share,
            auto_headroom=self.auto_headroom,
        )
        return EngineConfig(
            scheduler=scheduler, step_graphs=self.step_graphs == "on", compile_dynamics=self.compile_dynamics == "on"
        )

    def as_dict(self) -> dict:
        """The settings, with secrets masked (safe to log)."""
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        if values["tokens"]:
            values["tokens"] = "***"
        return values


_HELP = {
    "host": "address for gRPC",
    "port": "gRPC port (0: pick a free one); a port another process listens on is refused",
    "reuse_port": "on: share the gRPC port with other servers bound with SO_REUSEPORT (the kernel splits connections between them); off: refuse to start on a port in use",
    "metrics_host": "address for the Prometheus /metrics endpoint",
    "metrics_port": "metrics port (0: pick a free one; a port in use is refused)",
    "http_host": "address for HTTP: the Open Inference Protocol's REST API (KServe v2)",
    "http_port": "HTTP port (0: pick a free one; -1: no HTTP endpoint; a port in use is refused)",
    "checkpoints": "folder whose *.pt checkpoints are served, by file name",
    "device": "auto, cpu, cuda or cuda:N (auto: the GPU when present)",
    "policy": "fair (continuous batching: priority levels, then a fair share of the batch per request, with preemption), fifo (continuous batching, first come first served) or static (collect a batch, then solve it to the end)",
    "priority_levels": "request priorities 1 (most urgent) .. this; a request's 0 means default_priority",
    "default_priority": "the level of requests that do not set one, and the most urgent that callers may ask for without a token granted more (token_file)",
    "guaranteed_share": "fair policy: the fraction of a level's batch slots split equally between its requests (at least one each while there are slots for all); the rest goes by earliest virtual deadline",
    "lower_level_share": "fair policy: while less urgent priority levels have work, each level leaves them this fraction of the batch slots still free (at least one), so none starves; 0: strict priority",
    "client_queue_share": "a client (its bearer token; without tokens, its connection) already holding queued items may hold at most this fraction of the queue room the other clients leave free (beyond: RESOURCE_EXHAUSTED); its first request is admitted whenever it fits",
    "auto_headroom": "auto_tol: the share of its deadline or latency target within which a request's predicted completion must fall (smaller loosens more under load)",
    "max_batch": "most items in one running batch",
    "step_graphs": "on: continuous batching takes each solver step as one CUDA graph replay per padded batch size (GPU; not yet measured on one)",
    "warmup": "on: before a model is served (at start, and on reload before it replaces the old version) it solves each kind it answers in each precision it serves at the batch sizes the engine runs, so the first requests pay no one-time costs; a model whose warm-up fails is not served; off: serve at once",
    "compile_dynamics": "on: f is compiled by torch.compile per padded batch size (powers of two up to max_batch), each kept only where it measured faster than eager; the warm-up compiles them before a model serves (seconds each); off: f runs eagerly",
    "bfloat16": "native: serve requests in bfloat16 (precision bfloat16, or auto where the model card allows it) only on a device with bfloat16 units (CPUs with AVX512-BF16 or AMX, recent GPUs); on: also where it is emulated, which is slower than float32; off: float32 only",
    "keep_freed_memory": "on: glibc's malloc keeps the memory the solver's steps free (blocks up to 32 MB from its heaps, up to 256 MB free at a heap's top) for the next step instead of handing it back and faulting it in again (docs/server.md, 'Memory the steps give back'); not set where the C library is not glibc, LD_PRELOAD loads another allocator, or the environment sets glibc's thresholds (MALLOC_*_, glibc.malloc tunables); off: glibc's defaults",
    "max_delay_ms": "static policy: longest wait for a full batch",
    "max_queued_items": "items waiting beyond this are refused at once with RESOURCE_EXHAUSTED",
    "max_items_per_request": "images or points per request, and Sample's n",
    "max_nfe": "function evaluations per item before it stops with MAX_NFE",
    "max_request_nfe": "function evaluations over all items of one request (a request's max_total_nfe can only lower it)",
    "max_abs_input": "largest magnitude of a LogDensity coordinate (larger, or not finite in float32: INVALID_ARGUMENT)",
    "min_tol": "smallest tolerance a request may ask for",
    "max_tol": "largest tolerance a request may ask for",
    "max_message_bytes": "largest gRPC message or HTTP request body accepted, and gRPC message sent (the largest valid request, 1024 float32 images, is 3.2 MB)",
    "grace_seconds": "on SIGTERM, how long in-flight requests may take to finish",
    "max_connection_age_s": "close client connections after this long (0: never), so clients of scaled-out replicas reconnect and rebalance",
    "max_concurrent_rpcs": "calls the server holds at once, over all connections (beyond: RESOURCE_EXHAUSTED)",
    "max_concurrent_streams": "calls one client connection may have open at once (HTTP/2 streams)",
    "request_read_timeout_s": "a call must send its request message within this, or the server ends it (HTTP: a new connection its first request's head, and every request its body)",
    "handshake_timeout_s": "a new connection must finish its HTTP/2 (and TLS) handshake within this",
    "keepalive_time_s": "the server pings a connection idle this long, to find dead peers",
    "keepalive_timeout_s": "a connection whose keepalive ping is unanswered this long is closed",
    "min_client_ping_interval_s": "clients pinging more often than this without calls are disconnected",
    "max_inflight_bytes": "bytes of requests in flight (messages, decoded inputs, solver state); beyond: RESOURCE_EXHAUSTED",
    "metrics_max_connections": "connections the /metrics endpoint serves at once (more are closed at once)",
    "metrics_read_timeout_s": "a /metrics client must send its request within this",
    "http_max_connections": "connections the HTTP endpoint holds at once; beyond, a new one closes the one idle longest (or is closed when all are busy)",
    "http_idle_timeout_s": "an HTTP connection kept alive with no request in progress is closed after this (a new connection must send its first request's head within request_read_timeout_s)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text: one line per record, ending in request_id=... (and trace_id=...) when it is about a call; json: one JSON object per line (time, level, logger, message, request_id, trace_id)",
    "otlp_endpoint": "send traces of every call to this OpenTelemetry collector over OTLP/gRPC, e.g. http://otel-collector:4317 (https://: TLS); empty: tracing off (OpenTelemetry is never imported). Needs the extra: pip install 'odeserve[tracing]'",
    "trace_sample_ratio": "with otlp_endpoint: the fraction of calls traced that bring no traceparent; a caller's traceparent decides for its calls (sampled: traced)",
    "tls_cert": "PEM certificate chain: serve gRPC and HTTP over TLS (HTTPS)",
    "tls_key": "PEM private key for tls_cert",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
    "token_file": "file of accepted bearer tokens, one per line ('#' comments), each optionally followed by 'priority=N', the most urgent level it may ask for (default: default_priority); the inference service then needs one",
    "tokens": "comma-separated accepted bearer tokens, each optionally followed by ' priority=N' as in token_file; prefer ODESERVE_TOKENS or token_file over a flag",
}


DEPRECATED = ("batching",)
"""Settings still read, and mapped onto their successors (:func:`_replace_deprecated`)."""


def _environment() -> dict[str, str]:
    values = {}
    for name in (*(f.name for f in fields(ServerConfig)), *DEPRECATED):
        key = f"ODESERVE_{name.upper()}"
        if key in os.environ:
            values[name] = os.environ[key]
    return values


def _replace_deprecated(values: dict) -> None:
    """``batching`` (before ``policy`` took ``static``): ``static`` is ``policy = "static"``
    (whatever ``policy`` says, as before), ``continuous`` leaves ``policy`` as it is; either is
    logged as deprecated. A ValueError for any other value."""
    if "batching" not in values:
        return
    batching = values.pop("batching")
    if batching == "static":
        log.warning("the setting batching = 'static' is deprecated: it is read as policy = 'static'; set that instead")
        values["policy"] = "static"
    elif batching == "continuous":
        log.warning(
            "the setting batching = 'continuous' is deprecated and changes nothing: drop it (policy chooses among %s)",
            ", ".join(POLICIES),
        )
    else:
        raise ValueError(f"batching (deprecated: use policy) must be continuous or static, got {batching!r}")


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve odeserve checkpoints over gRPC; every request picks its own solver tolerance. "
        "Each flag can also come from ODESERVE_<FLAG> in the environment or from a TOML --config file.",
    )
    parser.add_argument(
        "--config", type=Path, help="TOML file with any of the settings below (same names, underscores)"
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(default),
            default=None,
            help=f"{_HELP[f.name]} (default: {default})",
        )
    parser.add_argument("--batching", default=None, help=argparse.SUPPRESS)  # deprecated: --policy static
    args = parser.parse_args(argv)
    values: dict = {}
    if args.config is not None:
        with args.config.open("rb") as handle:
            values.update(tomllib.load(handle))
    values.update(_environment())
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        _replace_deprecated(values)
    except ValueError as error:
        parser.error(str(error))
    unknown = set(values) - {f.name for f in fields(ServerConfig)}
    if unknown:
        parser.error(f"unknown settings: {', '.join(sorted(unknown))}")
    try:
        converted = {
            f.name: type(getattr(defaults, f.name))(values[f.name]) for f in fields(ServerConfig) if f.name in values
        }
        return ServerConfig(**converted)
    except ValueError as error:
        parser.error(str(error))
