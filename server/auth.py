"""Transport security and bearer-token authentication for the gRPC port.

TLS (and mutual TLS) comes from gRPC's own credentials. Tokens guard the inference service
only: health checks and reflection stay open so load balancers and probes need no secret.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from .config import ServerConfig
from .stats import RequestStats, StatsSink

log = logging.getLogger("server.auth")

PROTECTED_SERVICE = "/odeserve.v1.Inference/"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; client certificates are required
    (and checked against ``tls_client_ca``) for mutual TLS."""
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def accepted_tokens(config: ServerConfig) -> list[bytes]:
    """Tokens from ``tokens`` (comma-separated) and ``token_file`` (one per line)."""
    tokens = [t.strip() for t in config.tokens.split(",")]
    if config.token_file:
        for line in Path(config.token_file).read_text().splitlines():
            tokens.append(line.split("#", 1)[0].strip())
    return [t.encode() for t in tokens if t]


class TokenAuth(grpc.ServerInterceptor):
    """Refuses inference calls without ``authorization: Bearer <token>`` naming an accepted
    token (UNAUTHENTICATED). Every accepted token is compared in constant time, so timing
    reveals neither a token nor which one matched."""

    def __init__(self, tokens: list[bytes], stats: StatsSink) -> None:
        if not tokens:
            raise ValueError("token authentication needs at least one token")
        self._tokens, self._stats = tokens, stats

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if not method.startswith(PROTECTED_SERVICE):
            return continuation(handler_call_details)
        problem = self._check(dict(handler_call_details.invocation_metadata or ()).get("authorization"))
        if problem is None:
            return continuation(handler_call_details)
        rpc = method.removeprefix(PROTECTED_SERVICE)
        self._stats(RequestStats(model="unknown", method="none", rpc=rpc, code="UNAUTHENTICATED", latency_seconds=0.0))

        def refuse(request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return grpc.unary_unary_rpc_method_handler(refuse)

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
