"""The synchronous client."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

from . import _convert as c


class Client:
    """A connection to an odeserve server; every call takes its own tolerance.

    >>> with Client("127.0.0.1:50051") as client:
    ...     result = client.classify(images, model="odenet-mnist", tol=1e-2)

    ``timeout_s`` is the default deadline per call; ``tls`` a :class:`TLS` (or True for the
    system's roots); ``token`` a bearer token sent with every call. UNAVAILABLE is retried
    ``retries`` times with backoff. Failures raise :class:`OdeServeError`. With replicas behind
    one name (``dns:///odeserve-headless:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``),
    ``load_balancing="round_robin"`` spreads calls over all of them instead of one connection.
    """

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
        self._channel = c.open_channel(grpc, target, tls, max_message_bytes, retries, load_balancing)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout_s, self._metadata = timeout_s, c.metadata(token)

    def classify(self, images, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None,
                 version: str = "", timeout_s: float | None = None) -> c.ClassifyResult:  # fmt: skip
        """Images as uint8 0–255 or float32 in [0, 1], shaped [N, 28, 28] or [N, 1, 28, 28]."""
        request = pb.ClassifyRequest(model=model, version=version, images=c.images_tensor(images),
                                     accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.classify_result(self._call(self._stub.Classify, request, timeout_s))

    def sample(self, n: int, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None, seed: int = 0,
               version: str = "", timeout_s: float | None = None) -> c.SampleResult:  # fmt: skip
        """``n`` points and their log-densities; the same seed gives the same points."""
        request = pb.SampleRequest(model=model, version=version, n=n, seed=seed,
                                   accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.sample_result(self._call(self._stub.Sample, request, timeout_s))

    def log_density(self, points, *, model: str, tol=None, rtol=None, atol=None, method=None, max_nfe=None,
                    version: str = "", timeout_s: float | None = None) -> c.LogDensityResult:  # fmt: skip
        """Points as float32/float64 [N, D]."""
        request = pb.LogDensityRequest(model=model, version=version, points=c.points_tensor(points),
                                       accuracy=c.accuracy(tol, rtol, atol, method, max_nfe))  # fmt: skip
        return c.log_density_result(self._call(self._stub.LogDensity, request, timeout_s))

    def models(self, timeout_s: float | None = None) -> list[c.ModelInfo]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return [c.model_info(m) for m in response.models]

    def model(self, name: str, version: str = "", timeout_s: float | None = None) -> c.ModelInfo:
        return c.model_info(self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version), timeout_s))

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING" while draining) of the
        server (``service=""``), its Inference service, or one model by name."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call(self, method, request, timeout_s: float | None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise c.to_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
