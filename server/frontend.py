"""The gRPC front end on asyncio (``grpc.aio``): no thread per call, so no client can lock
others out by holding calls open.

Every RPC of every wire protocol goes through one handler: it reads the request message
itself, within ``request_read_timeout_s`` (a call that never sends one is cancelled, not left
holding anything), decodes it (an undecodable message is INVALID_ARGUMENT, counted like any
other refusal), hands it to its protocol's translator, and records the outcome — with label
values only from closed sets. Health, reflection and token auth live here too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from .api import Caller, CallRecord, Code, RequestError, invalid
from .config import ServerConfig
from .service import Call, InferenceService
from .stats import RequestStats, StatsSink

log = logging.getLogger("server.frontend")

UNKNOWN = "unknown"
_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in Code}


@dataclass(frozen=True)
class Rpc:
    """One method of a wire protocol: its request type and its translator."""

    service: str
    name: str
    request: type[Message]
    handle: Callable[[Message, Call], Awaitable[Message]]
    protected: bool = True  # needs a bearer token when tokens are configured

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; client certificates are required
    (and checked against ``tls_client_ca``) for mutual TLS."""
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass(frozen=True)
class Token:
    """An accepted bearer token and the most urgent priority level its callers may ask for
    (None: ``default_priority``, like callers without a token)."""

    secret: bytes
    max_priority: int | None = None


def read_tokens(config: ServerConfig) -> list[Token]:
    """Tokens from ``tokens`` (comma-separated) and ``token_file`` (one per line), each
    optionally followed by ``priority=N``. A malformed grant is a ValueError that names where
    it is, never the token."""
    entries = [(f"tokens entry {n}", entry) for n, entry in enumerate(config.tokens.split(","), 1)]
    if config.token_file:
        lines = Path(config.token_file).read_text().splitlines()
        entries += [(f"{config.token_file} line {n}", line.split("#", 1)[0]) for n, line in enumerate(lines, 1)]
    tokens = []
    for where, entry in entries:
        words = entry.split()
        if not words:
            continue
        grant = None
        for word in words[1:]:
            name, _, level = word.partition("=")
            if name != "priority" or not level.isdigit() or not 1 <= int(level) <= config.default_priority:
                raise ValueError(
                    f"{where}: a token may only be followed by 'priority=N', N in 1 .. "
                    f"{config.default_priority} (default_priority)"
                )
            grant = int(level)
        tokens.append(Token(words[0].encode(), grant))
    return tokens


def matching_token(tokens: Sequence[Token], header: str | None) -> Token | None:
    """The token an ``authorization: Bearer <token>`` header names, compared with every
    accepted one in constant time (timing reveals neither a token nor which one matched)."""
    if header is None:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    given_bytes = given.strip().encode()
    matched = None
    for token in tokens:
        if hmac.compare_digest(given_bytes, token.secret):
            matched = token
    return matched


def caller_of(context: grpc.aio.ServicerContext, tokens: Sequence[Token]) -> Caller:
    """Who a call comes from: its bearer token when tokens are configured (named by its place
    in the list, never by the secret), else its connection (the peer address)."""
    if tokens:
        header = dict(context.invocation_metadata() or ()).get("authorization")
        token = matching_token(tokens, header)
        if token is not None:
            return Caller(f"token {tokens.index(token) + 1}", token.max_priority)
    return Caller(context.peer() or UNKNOWN)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls to the protocols' services — all but their open probes (OIP's ServerLive,
    ServerReady) — without ``authorization: Bearer <token>`` naming an accepted token
    (UNAUTHENTICATED). Every accepted token is compared in constant
    time, so timing reveals neither a token nor which one matched. Refusals are counted under
    the RPC's name when it is one of ours, else under ``unknown``."""

    def __init__(self, tokens: list[bytes], rpcs: Sequence[Rpc], stats: StatsSink) -> None:
        if not tokens:
            raise ValueError("token authentication needs at least one token")
        self._tokens, self._stats = tokens, stats
        self._prefixes = tuple({f"/{rpc.service}/" for rpc in rpcs})
        self._open = {rpc.path for rpc in rpcs if not rpc.protected}
        self._names = {rpc.path: rpc.name for rpc in rpcs}

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if not method.startswith(self._prefixes) or method in self._open:
            return await continuation(handler_call_details)
        problem = self._check(dict(handler_call_details.invocation_metadata or ()).get("authorization"))
        if problem is None:
            return await continuation(handler_call_details)
        self._stats(
            RequestStats(
                model=UNKNOWN,
                method="none",
                rpc=self._names.get(method, UNKNOWN),
                code=Code.UNAUTHENTICATED.value,
                latency_seconds=0.0,
            )
        )
        return _refusal(grpc.StatusCode.UNAUTHENTICATED, problem)

    def _check(self, header: str | None) -> str | None:
        if header is None:
            return "missing 'authorization: Bearer <token>' metadata"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "the authorization metadata must be 'Bearer <token>'"
        given = token.strip().encode()
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(given, accepted)
        return None if matched else "the bearer token is not accepted"


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request (so a half-open call cannot hold it)."""

    async def refuse(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _UnknownMethods(grpc.GenericRpcHandler):
    """The last handler: any method no protocol serves is UNIMPLEMENTED, and counted once
    under ``rpc="unknown"`` whatever path the client made up."""

    def __init__(self, stats: StatsSink) -> None:
        self._stats = stats

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self._stats(
            RequestStats(model=UNKNOWN, method="none", rpc=UNKNOWN, code=Code.UNIMPLEMENTED.value, latency_seconds=0.0)
        )
        return _refusal(grpc.StatusCode.UNIMPLEMENTED, "unknown method (see server reflection)")


class Frontend:
    """The asyncio gRPC server for a set of protocols' RPCs."""

    def __init__(
        self,
        config: ServerConfig,
        service: InferenceService,
        rpcs: Sequence[Rpc],
        stats: StatsSink,
        extra_services: Callable[[grpc.aio.Server], None],
    ) -> None:
        self.config, self.service, self.stats = config, service, stats
        self.rpcs = list(rpcs)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout_s * 1000)),
            ("grpc.so_reuseport", 1 if config.reuse_port == "on" else 0),  # gRPC's default shares a busy port
        ]
        if config.max_connection_age_s > 0:  # a GOAWAY after this; calls in flight get the grace period to finish
            options += [
                ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
            ]
        self.accepted = read_tokens(config)
        tokens = [token.secret for token in self.accepted]
        self.credentials = server_credentials(config)
        interceptors = [TokenAuth(tokens, self.rpcs, stats)] if tokens else []
        self.tokens = len(tokens)
        self.server = grpc.aio.server(
            options=options, interceptors=interceptors, maximum_concurrent_rpcs=config.max_concurrent_rpcs
        )
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for rpc in self.rpcs:
            by_service.setdefault(rpc.service, {})[rpc.name] = self._handler(rpc)
        for service_name, handlers in by_service.items():
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        extra_services(self.server)
        self.server.add_generic_rpc_handlers((_UnknownMethods(stats),))

    def listen(self, address: str) -> int:
        if self.credentials is None:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, self.credentials)

    def _handler(self, rpc: Rpc) -> grpc.RpcMethodHandler:
        timeout = self.config.request_read_timeout_s

        async def handle(request_iterator, context: grpc.aio.ServicerContext):
            begin = time.perf_counter()
            record = CallRecord(rpc=rpc.name)
            reservation = self.service.budget.reservation()
            code, message, response = Code.OK, "", None
            try:
                raw = await _read(context, timeout)
                reservation.add(len(raw))
                try:
                    request = rpc.request.FromString(raw)
                except DecodeError:
                    raise invalid(f"the request is not a valid {rpc.request.DESCRIPTOR.full_name} message") from None
                caller = caller_of(context, self.accepted)
                response = await rpc.handle(request, Call(_remaining(context), record, reservation, caller))
            except RequestError as error:
                code, message = error.code, error.message
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                code = Code.DEADLINE_EXCEEDED if _expired(context) else Code.CANCELLED
                raise
            except Exception:  # noqa: BLE001 - a bug fails its call, never the server
                log.exception("%s failed", rpc.path)
                code, message = Code.INTERNAL, "internal error; the server logged the details"
            finally:
                reservation.release()
                self._record(record, code, time.perf_counter() - begin)
            if code is not Code.OK:
                await context.abort(_STATUS[code], message)
            return response

        return grpc.stream_unary_rpc_method_handler(handle, response_serializer=lambda m: m.SerializeToString())

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


async def _read(context: grpc.aio.ServicerContext, timeout: float) -> bytes:
    """The call's one request message, as bytes."""
    try:
        raw = await asyncio.wait_for(context.read(), timeout)
    except TimeoutError:
        raise RequestError(
            Code.CANCELLED, f"no request message arrived within {timeout:g} s; the server ended the call"
        ) from None
    if raw is grpc.aio.EOF:
        raise invalid("the call ended without a request message")
    return raw


def _remaining(context: grpc.aio.ServicerContext) -> Callable[[], float | None]:
    no_deadline = 10 * 365 * 24 * 3600.0  # gRPC reports "no deadline" as a far-off one

    def remaining() -> float | None:
        left = context.time_remaining()
        return None if left is None or left > no_deadline else left

    return remaining


def _expired(context: grpc.aio.ServicerContext) -> bool:
    left = _remaining(context)()
    return left is not None and left <= 0
