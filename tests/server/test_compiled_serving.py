"""``compile_dynamics = on`` against a real server: the warm-up compiles f for each padded batch
size before the model serves, answers are the eager server's (labels, NFE), and the compiles
are bounded and counted in /metrics."""

from __future__ import annotations

import shutil

import pytest
from live_server import CLASSIFIER, metric, scrape, start_server

from client import Client

MAX_BATCH = 4  # padded sizes 1, 2, 4


@pytest.fixture(scope="module")
def compiled_server(shipped, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier-compiled")
    shutil.copy(shipped / f"{CLASSIFIER}.pt", folder / f"{CLASSIFIER}.pt")
    running = start_server(
        folder, tmp_path_factory.mktemp("compiled"), "--compile-dynamics", "on", "--max-batch", str(MAX_BATCH)
    )
    yield running
    assert running.stop() == 0


def _compiles(metrics_url: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["precision"], s.labels["used"]): s.value
        for s in scrape(metrics_url)
        if s.name == "odeserve_dynamics_compiles_total" and s.labels["model"] == CLASSIFIER
    }


def test_answers_are_the_eager_servers_and_compiles_happen_before_serving(compiled_server, server, mnist_test_digits):
    images, labels = mnist_test_digits
    before = _compiles(compiled_server.metrics_url)
    float32 = sum(count for (precision, _), count in before.items() if precision == "float32")
    assert float32 == 3, before  # the warm-up compiled every padded size: 1, 2 and 4 rows
    with Client(compiled_server.target, timeout_s=120) as fused, Client(server.target, timeout_s=120) as eager:
        for batch in (images[:3], images[3:10]):
            ours, theirs = (
                fused.classify(batch, model=CLASSIFIER, tol=1e-2),
                eager.classify(batch, model=CLASSIFIER, tol=1e-2),
            )
            assert ours.labels.tolist() == theirs.labels.tolist()
            assert ours.items.nfe.tolist() == theirs.items.nfe.tolist()
    assert _compiles(compiled_server.metrics_url) == before  # nothing compiled while serving
    assert metric(compiled_server.metrics_url, "odeserve_dynamics_compile_seconds_total", model=CLASSIFIER) > 0
