"""The asyncio client."""

from __future__ import annotations

import grpc

from . import _calls
from ._shell import Connection, awaitable


class AsyncClient(Connection):
    """The calls and constructor of :class:`client.Client`, awaitable; one event loop per client.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     result = await client.classify(images, model="odenet-mnist", tol=1e-2)
    """

    _grpc = grpc.aio

    classify = awaitable(_calls.classify)
    sample = awaitable(_calls.sample)
    log_density = awaitable(_calls.log_density)
    models = awaitable(_calls.models)
    model = awaitable(_calls.model)
    health = awaitable(_calls.health)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
