"""The asyncio client: the same calls as :class:`client.Client`, awaitable."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

from . import _convert as c


class AsyncClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        tls: c.TLS | bool | None = None,
        token: str | None = None,
        retries: int = 3,
        max_message_bytes: int = 16 * 1024 * 1024,
        load_balancing: str = "pick_first",
    ) -> None:
        self._channel = c.open_channel(grpc.aio, target, tls, max_message_bytes, retries, load_balancing)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout_s, self._metadata = timeout_s, c.metadata(token)

    async def classify(self, images, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None,
                       version: str = "", timeout_s: float | None = None) -> c.ClassifyResult:  # fmt: skip
        request = pb.ClassifyRequest(model=model, version=version, images=c.images_tensor(images),
                                     accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.classify_result(await self._call(self._stub.Classify, request, timeout_s))

    async def sample(self, n: int, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None,
                     seed: int = 0, version: str = "", timeout_s: float | None = None) -> c.SampleResult:  # fmt: skip
        request = pb.SampleRequest(model=model, version=version, n=n, seed=seed,
                                   accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.sample_result(await self._call(self._stub.Sample, request, timeout_s))

    async def log_density(self, points, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None,
                          version: str = "", timeout_s: float | None = None) -> c.LogDensityResult:  # fmt: skip
        request = pb.LogDensityRequest(model=model, version=version, points=c.points_tensor(points),
                                       accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.log_density_result(await self._call(self._stub.LogDensity, request, timeout_s))

    async def models(self, timeout_s: float | None = None) -> list[c.ModelInfo]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return [c.model_info(m) for m in response.models]

    async def model(self, name: str, version: str = "", timeout_s: float | None = None) -> c.ModelInfo:
        return c.model_info(await self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version), timeout_s))

    async def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """As :meth:`client.Client.health`."""
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _call(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise c.to_error(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
