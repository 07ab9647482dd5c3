"""The standard ``grpc.health.v1.Health`` service, with the models' entries behind the bearer
token when tokens are configured.

Probes and load balancers ask for the overall entry (``""``) or a protocol's service name, and
those stay open. A model's entry names a model, and ``ListModels`` needs a token: so without an
accepted token, ``Check`` of any other name is answered as for a name never registered
(``NOT_FOUND``; ``Watch``: ``SERVICE_UNKNOWN``), and health does not confirm which models exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from .auth import Token, matching_token


class Health(health_aio.HealthServicer):
    def __init__(self, open_names: Iterable[str]) -> None:
        super().__init__()
        self.open_names = frozenset(open_names)
        self.tokens: Sequence[Token] = ()  # the accepted tokens, once the front end has read them

    def _hidden(self, service: str, context: grpc.aio.ServicerContext) -> bool:
        if not self.tokens or service in self.open_names:
            return False
        header = dict(context.invocation_metadata() or ()).get("authorization")
        return matching_token(self.tokens, header) is None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        if self._hidden(request.service, context):
            await context.abort(grpc.StatusCode.NOT_FOUND)  # what an unregistered name gets
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self._hidden(request.service, context):
            await context.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))
            await asyncio.Event().wait()  # an unregistered name's stream stays open, waiting for it
        await super().Watch(request, context)
