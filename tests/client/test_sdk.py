"""One SDK, two shells: every call, through ``Client`` and through ``AsyncClient``, against a
real server on the shipped checkpoints; and what ``help()`` shows of them."""

from __future__ import annotations

import asyncio
import inspect
import pydoc
import re
import typing

import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, start_server

import client._calls as calls
from client import AsyncClient, Client, OdeServeError
from neuralode.solvers import METHODS

DENSITY = DENSITIES[0]
DESCRIBED = [
    f
    for name, f in vars(calls).items()
    if inspect.isfunction(f)
    and f.__module__ == calls.__name__
    and not name.startswith("_")
    and inspect.signature(f).return_annotation.startswith("Call[")
]


class Driven:
    """An ``AsyncClient`` driven from synchronous test code on its own event loop, so one test
    body exercises both shells: ``driven.classify(...)`` awaits ``client.classify(...)``."""

    def __init__(self, target: str, **kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._open(target, kwargs))

    @staticmethod
    async def _open(target: str, kwargs: dict) -> AsyncClient:
        return AsyncClient(target, **kwargs)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        return lambda *args, **kwargs: self.loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def connect(shell: str, target: str, **kwargs) -> Client | Driven:
    return Client(target, **kwargs) if shell == "Client" else Driven(target, **kwargs)


SHELLS = ["Client", "AsyncClient"]


@pytest.fixture(scope="module", params=SHELLS)
def sdk(request, server):
    connection = connect(request.param, server.target, timeout_s=120)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def mnist_test(mnist_test_digits):
    images, labels = mnist_test_digits
    return images[:64], labels[:64]


def test_classify_real_mnist(sdk, mnist_test):
    images, labels = mnist_test
    result = sdk.classify(images, model=CLASSIFIER, tol=1e-2)
    assert result.items.all_succeeded and result.model_version
    assert result.probabilities.shape == (64, 10) and result.labels.shape == (64,)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(1))
    assert (result.labels == labels).mean() > 0.95
    assert result.timing.compute_seconds > 0


def test_every_request_option_reaches_the_server(sdk, mnist_test):
    images = mnist_test[0][:8]
    loose, tight = (sdk.classify(images, model=CLASSIFIER, rtol=tol, atol=tol) for tol in (1e-1, 1e-5))
    assert loose.items.nfe.mean() < tight.items.nfe.mean()
    assert sdk.classify(images, model=CLASSIFIER, tol=1e-5).items.nfe.tolist() == tight.items.nfe.tolist()
    other_method = sdk.classify(images, model=CLASSIFIER, tol=1e-5, method="bosh3")
    assert other_method.items.all_succeeded and other_method.items.nfe.tolist() != tight.items.nfe.tolist()
    capped = sdk.classify(images, model=CLASSIFIER, tol=1e-5, max_nfe=8)
    assert capped.items.status == ["MAX_NFE"] * 8 and (capped.labels == -1).all()


def test_sample_and_log_density_agree(sdk):
    first = sdk.sample(32, model=DENSITY, tol=1e-5, seed=3)
    np.testing.assert_array_equal(sdk.sample(32, model=DENSITY, tol=1e-5, seed=3).points, first.points)
    assert first.points.shape == (32, 2) and first.items.all_succeeded
    density = sdk.log_density(first.points, model=DENSITY, tol=1e-5)
    np.testing.assert_allclose(density.log_density, first.log_density, atol=2e-3)


def test_models_model_and_health(sdk):
    assert {m.name for m in sdk.models()} >= {CLASSIFIER, *DENSITIES}
    card = sdk.model(CLASSIFIER)
    assert card.task == "classify" and card.card["metrics"]["test_error"] <= 0.015
    assert sdk.health() == "SERVING" and sdk.health(DENSITY) == "SERVING"


def test_failures_raise_odeserve_error_with_the_code(sdk, mnist_test):
    with pytest.raises(OdeServeError) as invalid:
        sdk.classify(mnist_test[0][:2], model=CLASSIFIER, tol=2.0)
    assert invalid.value.code == "INVALID_ARGUMENT" and "accuracy.tol" in invalid.value.message
    with pytest.raises(OdeServeError, match="NOT_FOUND"):
        sdk.model("no-such-model")
    with pytest.raises(OdeServeError, match="DEADLINE_EXCEEDED"):  # a call's own deadline wins over the client's
        sdk.classify(mnist_test[0][:2], model=CLASSIFIER, tol=1e-5, timeout_s=1e-6)


def test_results_and_failures_carry_the_servers_request_id(sdk, mnist_test):
    """The id that names a call in the server's logs (trailing metadata ``x-request-id``)."""
    result = sdk.sample(2, model=DENSITY, tol=1e-2, seed=1)
    assert re.fullmatch(r"[0-9a-f]{32}", result.request_id)
    with pytest.raises(OdeServeError) as failed:
        sdk.classify(mnist_test[0][:2], model=CLASSIFIER, tol=2.0)
    assert re.fullmatch(r"[0-9a-f]{32}", failed.value.request_id)
    assert failed.value.request_id != result.request_id


def test_scheduling_options_and_auto_tolerance_reach_the_server(sdk, mnist_test, shipped):
    from neuralode.checkpoint import read_card

    images = mnist_test[0][:4]
    table = sorted(row.tol for row in read_card(shipped / f"{CLASSIFIER}.pt").metrics.table)
    relaxed = sdk.classify(images, model=CLASSIFIER, tol="auto", latency_target_s=60.0, priority=3)
    assert relaxed.solved.rtol == relaxed.solved.atol == table[0] and relaxed.solved.method == "dopri5"
    hurried = sdk.classify(images, model=CLASSIFIER, tol="auto", latency_target_s=1e-6)
    assert hurried.solved.rtol == table[-1] and hurried.items.nfe.mean() < relaxed.items.nfe.mean()
    with pytest.raises(OdeServeError, match="RESOURCE_EXHAUSTED.*budget of 10 cannot pay for 4 items"):
        sdk.classify(images, model=CLASSIFIER, tol=1e-2, max_total_nfe=10)
    with pytest.raises(OdeServeError, match="INVALID_ARGUMENT.*scheduling.priority"):
        sdk.classify(images, model=CLASSIFIER, tol=1e-2, priority=9)
    fixed = sdk.log_density(np.zeros((2, 2), np.float32), model=DENSITY, tol=1e-4, method="tsit5")
    assert (fixed.solved.rtol, fixed.solved.atol, fixed.solved.method, fixed.solved.preemptions) == (
        1e-4,
        1e-4,
        "tsit5",
        0,
    )


def test_an_unknown_keyword_is_a_type_error_before_anything_is_sent(sdk):
    with pytest.raises(
        TypeError,
        match="'tols'.*tol, rtol, atol, method, max_nfe, precision, latency_target_s, priority, max_total_nfe",
    ):
        sdk.sample(2, model=DENSITY, tols=1e-3)
    with pytest.raises(TypeError):
        sdk.models(verbose=True)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tol": "1e-2"}, "tol must be a number or 'auto', got '1e-2' (str)"),
        ({"tol": True}, "tol must be a number or 'auto', got True (bool)"),
        ({"max_nfe": 2.5}, "max_nfe must be an integer, got 2.5 (float)"),
        ({"method": 5}, "method must be a string, got 5 (int)"),
    ],
)
def test_an_option_of_the_wrong_type_is_a_type_error_naming_it(options, message):
    """Before, protobuf raised a bare TypeError naming no option; numpy scalars stay welcome."""
    with pytest.raises(TypeError) as error:
        calls.sample(2, model=DENSITY, **options)
    assert str(error.value) == message
    assert calls.sample(2, model=DENSITY, tol=np.float32(1e-3), max_nfe=np.int64(50)).request.accuracy.max_nfe == 50


@pytest.fixture(scope="module")
def token_server(density_only, tmp_path_factory):
    running = start_server(density_only, tmp_path_factory.mktemp("token"), env={"ODESERVE_TOKENS": "sdk-token-51e0"})
    yield running
    assert running.stop() == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_the_token_goes_with_every_call(shell, token_server):
    for token, expected in (("sdk-token-51e0", None), ("wrong", "UNAUTHENTICATED"), (None, "UNAUTHENTICATED")):
        connection = connect(shell, token_server.target, timeout_s=30, token=token, retries=0)
        try:
            if expected is None:
                assert connection.sample(2, model=DENSITY, tol=1e-3).items.all_succeeded
            else:
                with pytest.raises(OdeServeError, match=expected):
                    connection.sample(2, model=DENSITY, tol=1e-3)
        finally:
            connection.close()


def test_both_shells_offer_every_described_call_with_its_signature_and_docstring():
    assert {f.__name__ for f in DESCRIBED} == {"classify", "sample", "log_density", "models", "model", "health"}
    for describe in DESCRIBED:
        blocking, awaitable = getattr(Client, describe.__name__), getattr(AsyncClient, describe.__name__)
        assert inspect.signature(blocking) == inspect.signature(awaitable)
        assert inspect.iscoroutinefunction(awaitable) and not inspect.iscoroutinefunction(blocking)
        assert blocking.__doc__ == awaitable.__doc__ and blocking.__doc__.startswith(inspect.getdoc(describe))
        returns = inspect.signature(blocking).return_annotation
        assert returns == inspect.signature(describe).return_annotation.removeprefix("Call[").removesuffix("]")


def test_help_spells_out_the_request_options_with_their_types():
    signature = inspect.signature(Client.classify)
    assert list(signature.parameters) == [
        "self",
        "images",
        "model",
        "version",
        "timeout_s",
        "tol",
        "rtol",
        "atol",
        "method",
        "max_nfe",
        "precision",
        "latency_target_s",
        "priority",
        "max_total_nfe",
    ]
    assert signature.parameters["max_nfe"].annotation == "int | None" and signature.parameters["tol"].default is None
    assert signature.return_annotation == "ClassifyResult"
    text = pydoc.render_doc(AsyncClient.log_density, renderer=pydoc.plaintext)
    assert "async log_density(self, points: 'npt.ArrayLike', *, model: 'str'" in text
    assert "max_total_nfe: 'int | None' = None) -> 'LogDensityResult'" in text
    assert "Exact log-densities" in text and "tol       rtol = atol = tol" in text
    assert "models(self, timeout_s: 'float | None' = None) -> 'list[ModelInfo]'" in pydoc.render_doc(
        Client.models, renderer=pydoc.plaintext
    )


def test_the_sdks_methods_are_the_servers_adaptive_ones():
    # The SDK has no torch: it lists the methods itself, and this keeps the list the server's.
    assert sorted(calls.ADAPTIVE_METHODS) == sorted(name for name, method in METHODS.items() if method.adaptive)
    assert calls.ADAPTIVE_METHODS[0] == "dopri5"  # the server's default, first in the help
    help_text = typing.get_type_hints(calls.RequestOptions, include_extras=True)["method"].__metadata__[0]
    assert help_text == (
        '"dopri5" (default), or another adaptive method: "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun"'
    )
