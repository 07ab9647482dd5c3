"""The gRPC front end on asyncio (``grpc.aio``): no thread per call, so no client can lock
others out by holding calls open.

Every RPC of every wire protocol goes through one handler: it reads the request message
itself, within ``request_read_timeout_s`` (a call that never sends one is cancelled, not left
holding anything), decodes it (an undecodable message is INVALID_ARGUMENT, counted like any
other refusal), hands it to its protocol's translator, and records the outcome — with label
values only from closed sets. Every answer carries the call's request id as ``x-request-id``
trailing metadata. Health, reflection and token auth live here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from .api import Caller, Code, RequestError, invalid
from .auth import Token, identify, read_tokens, unauthenticated
from .calls import CallRunner, CallTracer
from .config import ServerConfig
from .service import Call, InferenceService
from .stats import StatsSink

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


def caller_of(context: grpc.aio.ServicerContext, tokens: Sequence[Token]) -> Caller:
    header = dict(context.invocation_metadata() or ()).get("authorization")
    return identify(tokens, header, context.peer() or UNKNOWN)


def headers_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """A call's text metadata (gRPC sends its keys in lower case), for the call runner."""
    return {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls to the protocols' services — all but their open probes (OIP's ServerLive,
    ServerReady) — without ``authorization: Bearer <token>`` naming an accepted token
    (UNAUTHENTICATED). Every accepted token is compared in constant
    time, so timing reveals neither a token nor which one matched. Refusals are counted under
    the RPC's name when it is one of ours, else under ``unknown``."""

    def __init__(self, tokens: list[Token], rpcs: Sequence[Rpc], calls: CallRunner) -> None:
        if not tokens:
            raise ValueError("token authentication needs at least one token")
        self._tokens, self._calls = tokens, calls
        self._prefixes = tuple({f"/{rpc.service}/" for rpc in rpcs})
        self._open = {rpc.path for rpc in rpcs if not rpc.protected}
        self._names = {rpc.path: rpc.name for rpc in rpcs}

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if not method.startswith(self._prefixes) or method in self._open:
            return await continuation(handler_call_details)
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        problem = unauthenticated(self._tokens, header, "metadata")
        if problem is None:
            return await continuation(handler_call_details)
        self._calls.refused(self._names.get(method, UNKNOWN), Code.UNAUTHENTICATED)
        return _refusal(grpc.StatusCode.UNAUTHENTICATED, problem)


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request (so a half-open call cannot hold it)."""

    async def refuse(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _UnknownMethods(grpc.GenericRpcHandler):
    """The last handler: any method no protocol serves is UNIMPLEMENTED, and counted once
    under ``rpc="unknown"`` whatever path the client made up."""

    def __init__(self, calls: CallRunner) -> None:
        self._calls = calls

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self._calls.refused(UNKNOWN, Code.UNIMPLEMENTED)
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
        tracer: CallTracer | None = None,
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
        self.calls = CallRunner(service.budget, stats, tracer)
        self.accepted = read_tokens(config)
        self.credentials = server_credentials(config)
        interceptors = [TokenAuth(self.accepted, self.rpcs, self.calls)] if self.accepted else []
        self.tokens = len(self.accepted)
        self.server = grpc.aio.server(
            options=options, interceptors=interceptors, maximum_concurrent_rpcs=config.max_concurrent_rpcs
        )
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for rpc in self.rpcs:
            by_service.setdefault(rpc.service, {})[rpc.name] = self._handler(rpc)
        for service_name, handlers in by_service.items():
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        extra_services(self.server)
        self.server.add_generic_rpc_handlers((_UnknownMethods(self.calls),))

    def listen(self, address: str) -> int:
        if self.credentials is None:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, self.credentials)

    def _handler(self, rpc: Rpc) -> grpc.RpcMethodHandler:
        timeout = self.config.request_read_timeout_s

        async def handle(request_iterator, context: grpc.aio.ServicerContext):
            async def body(call: Call) -> Message:
                raw = await _read(context, timeout)
                call.reservation.add(len(raw))
                try:
                    request = rpc.request.FromString(raw)
                except DecodeError:
                    raise invalid(f"the request is not a valid {rpc.request.DESCRIPTOR.full_name} message") from None
                return await rpc.handle(request, call)

            answer = await self.calls.run(
                rpc.name,
                body,
                remaining=_remaining(context),
                caller=lambda: caller_of(context, self.accepted),
                expired=lambda: _expired(context),
                headers=headers_of(context),
            )
            trailing = (("x-request-id", answer.request_id),)
            if answer.code is not Code.OK:
                await context.abort(_STATUS[answer.code], answer.message, trailing_metadata=trailing)
            context.set_trailing_metadata(trailing)
            return answer.response

        return grpc.stream_unary_rpc_method_handler(handle, response_serializer=lambda m: m.SerializeToString())


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
