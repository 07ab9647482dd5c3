"""/metrics, scraped over HTTP after real traffic."""

import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, scrape, value

from client import OdeServeError


def test_metrics_reflect_the_traffic(server, client):
    before = scrape(server.metrics_url)
    ok_before = value(before, "odeserve_requests_total", model=CLASSIFIER, rpc="Classify", code="OK")
    nfe_before = value(before, "odeserve_item_nfe_count", model=CLASSIFIER)
    images = np.zeros((5, 28, 28), np.uint8)
    for tol in (1e-1, 1e-3, 1e-5):
        client.classify(images, model=CLASSIFIER, tol=tol)
    client.sample(3, model=DENSITIES[0], tol=1e-3)
    with pytest.raises(OdeServeError):
        client.classify(images, model=CLASSIFIER, tol=-1.0)
    metrics = scrape(server.metrics_url)

    assert value(metrics, "odeserve_requests_total", model=CLASSIFIER, rpc="Classify", code="OK") == ok_before + 3
    assert value(metrics, "odeserve_requests_total", model=CLASSIFIER, rpc="Classify", code="INVALID_ARGUMENT") >= 1
    assert value(metrics, "odeserve_requests_total", model=DENSITIES[0], rpc="Sample", code="OK") >= 1
    assert not any("tol" in s.labels for s in metrics)  # never a tolerance label

    assert value(metrics, "odeserve_item_nfe_count", model=CLASSIFIER) == nfe_before + 15
    assert value(metrics, "odeserve_item_nfe_bucket", model=CLASSIFIER, le="+Inf") == nfe_before + 15
    assert value(metrics, "odeserve_item_nfe_bucket", model=CLASSIFIER, le="2.0") == 0  # every solve takes more

    assert value(metrics, "odeserve_request_latency_seconds_count", model=CLASSIFIER, rpc="Classify") >= 4
    assert 0 < value(metrics, "odeserve_request_latency_seconds_sum", model=CLASSIFIER, rpc="Classify") < 60
    assert value(metrics, "odeserve_queue_wait_seconds_count", model=CLASSIFIER) >= 3
    assert value(metrics, "odeserve_compute_seconds_count", model=CLASSIFIER) >= 3

    steps = value(metrics, "odeserve_solver_steps_total", model=CLASSIFIER, method="dopri5")
    assert steps >= 15 * 2  # every item takes at least two steps
    assert any(s.name == "odeserve_rejected_steps_total" for s in metrics)
    assert value(metrics, "odeserve_items_total", model=CLASSIFIER, status="SUCCESS") >= 15
    assert value(metrics, "odeserve_queued_items", model=CLASSIFIER) == 0
    occupancy = value(metrics, "odeserve_batch_occupancy_ratio", model=CLASSIFIER)
    assert 0 < occupancy <= 1
