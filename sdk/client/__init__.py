"""odeserve's client SDK (no torch): ``Client`` here, ``AsyncClient`` in ``client.aio``,
and the ``python -m client`` command line."""

from ._convert import (
    TLS,
    ClassifyResult,
    Items,
    LogDensityResult,
    ModelInfo,
    OdeServeError,
    SampleResult,
    Timing,
)
from .sdk import Client

__all__ = [
    "TLS",
    "ClassifyResult",
    "Client",
    "Items",
    "LogDensityResult",
    "ModelInfo",
    "OdeServeError",
    "SampleResult",
    "Timing",
]
