"""The synchronous client."""

from __future__ import annotations

from . import _calls
from ._shell import Connection, blocking


class Client(Connection):
    """A connection to an odeserve server; every call takes its own tolerance.

    >>> with Client("127.0.0.1:50051") as client:
    ...     result = client.classify(images, model="odenet-mnist", tol=1e-2)

    ``timeout_s`` is the default deadline per call; ``tls`` a :class:`TLS` (or True for the
    system's roots); ``token`` a bearer token sent with every call. UNAVAILABLE is retried
    ``retries`` times with backoff. Failures raise :class:`OdeServeError`. With replicas behind
    one name (``dns:///odeserve-headless:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``),
    ``load_balancing="round_robin"`` spreads calls over all of them instead of one connection.
    """

    classify = blocking(_calls.classify)
    sample = blocking(_calls.sample)
    log_density = blocking(_calls.log_density)
    models = blocking(_calls.models)
    model = blocking(_calls.model)
    health = blocking(_calls.health)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
