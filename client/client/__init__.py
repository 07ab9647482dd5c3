"""odeserve's client SDK (no torch): ``Client``, ``AsyncClient`` (also in ``client.aio``),
and the ``python -m client`` command line."""

from ._calls import RequestOptions
from ._convert import ClassifyResult, Items, LogDensityResult, ModelInfo, SampleResult, Solved, Timing
from ._shell import TLS, OdeServeError
from .aio import AsyncClient
from .sdk import Client

__all__ = [
    "TLS",
    "AsyncClient",
    "ClassifyResult",
    "Client",
    "Items",
    "LogDensityResult",
    "ModelInfo",
    "OdeServeError",
    "RequestOptions",
    "SampleResult",
    "Solved",
    "Timing",
]
