"""/metrics, scraped over HTTP after real traffic."""

import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, scrape, value

from client import OdeServeError


def test_metrics_reflect_the_traffic(server, client):
    before = scrape(server.metrics_url)
    ok_before = value(before, "odeserve_requests_total", model=CLASSIFIER, rpc="Classify", code="OK")
    nfe_before = value(before, "odeserve_item_nfe_count", model=CLASSIFIER)
    cheap_before = value(before, "odeserve_item_nfe_bucket", model=CLASSIFIER, le="2.0")
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
    assert value(metrics, "odeserve_item_nfe_bucket", model=CLASSIFIER, le="2.0") == cheap_before  # each took more

    assert value(metrics, "odeserve_request_latency_seconds_count", model=CLASSIFIER, rpc="Classify") >= 4
    assert 0 < value(metrics, "odeserve_request_latency_seconds_sum", model=CLASSIFIER, rpc="Classify") < 60
    assert value(metrics, "odeserve_queue_wait_seconds_count", model=CLASSIFIER) >= 3
    assert value(metrics, "odeserve_compute_seconds_count", model=CLASSIFIER) >= 3

    steps = value(metrics, "odeserve_solver_steps_total", model=CLASSIFIER, method="dopri5")
    assert steps >= 15 * 2  # every item takes at least two steps
    assert any(s.name == "odeserve_rejected_steps_total" for s in metrics)
    assert value(metrics, "odeserve_items_total", model=CLASSIFIER, status="SUCCESS") >= 15
    assert value(metrics, "odeserve_queued_items", model=CLASSIFIER) == 0


def test_card_nfe_expectation_and_queue_capacity_are_exported(server, client, shipped):
    """The drift alert divides served NFE by the card's NFE at the requests' tolerances, and
    the saturation alert divides queued items by the queue's capacity: both come from here."""
    from server.models import load_models

    card_table = {row.tol: row.nfe_mean for row in load_models(shipped, "cpu")[CLASSIFIER].card.metrics.table}
    before = value(scrape(server.metrics_url), "odeserve_item_expected_nfe_total", model=CLASSIFIER, method="dopri5")
    client.classify(np.zeros((4, 28, 28), np.uint8), model=CLASSIFIER, tol=1e-3)
    client.classify(np.zeros((2, 28, 28), np.uint8), model=CLASSIFIER, tol=1e-3, method="bosh3")  # no card figure
    metrics = scrape(server.metrics_url)

    expected = value(metrics, "odeserve_item_expected_nfe_total", model=CLASSIFIER, method="dopri5") - before
    assert expected == pytest.approx(4 * card_table[1e-3], rel=1e-9)
    assert value(metrics, "odeserve_item_expected_nfe_total", model=CLASSIFIER, method="bosh3") == 0
    for model in (CLASSIFIER, *DENSITIES):
        assert value(metrics, "odeserve_queue_capacity_items", model=model) == 4096  # the default max_queued_items


def test_card_nfe_is_interpolated_as_a_power_law_in_the_tolerance():
    from neuralode.card import ModelCard
    from server.models import ServedModel

    card = ModelCard.from_dict(
        {
            "kind": "odenet",
            "hyper": {"method": "dopri5"},
            "metrics": {
                "table": [
                    {"tol": 1.0, "nfe_mean": 10.0},
                    {"tol": 1e-4, "nfe_mean": 40.0},
                    {"tol": 1e-2, "nfe_mean": 20.0},
                ]
            },
        }
    )
    model = ServedModel("m", "v", "odenet", "classify", card, adapter=None, default_tol=1e-3, device="cpu")
    assert model.expected_nfe("dopri5", 1e-2) == pytest.approx(20.0)
    assert model.expected_nfe("dopri5", 1e-3) == pytest.approx(800**0.5)  # geometric mean of 40 and 20
    assert model.expected_nfe("dopri5", 1e-6) == pytest.approx(80.0)  # the tightest segment, continued
    assert model.expected_nfe("dopri5", 10.0) == pytest.approx(10.0)  # never below the loosest
    assert model.expected_nfe("rk4", 1e-2) is None
    one_row = ServedModel(
        "m",
        "v",
        "cnf",
        "density",
        ModelCard.from_dict(
            {"kind": "cnf", "hyper": {"method": "dopri5"}, "metrics": {"table": [{"tol": 1e-3, "nfe_mean": 21.0}]}}
        ),
        adapter=None,
        default_tol=1e-3,
        device="cpu",
    )
    assert one_row.expected_nfe("dopri5", 1e-5) == 21.0
    steep = ServedModel(  # one step at loose tolerances: a steep tightest segment (shipped cnf-moons)
        "m",
        "v",
        "cnf",
        "density",
        ModelCard.from_dict(
            {
                "kind": "cnf",
                "hyper": {"method": "dopri5"},
                "metrics": {"table": [{"tol": 1e-4, "nfe_mean": 24.0}, {"tol": 1e-3, "nfe_mean": 10.0}]},
            }
        ),
        adapter=None,
        default_tol=1e-3,
        device="cpu",
    )
    # Below the table: dopri5's own rate (error order 4: a fifth of a decade per decade), not the segment's 0.38.
    assert steep.expected_nfe("dopri5", 1e-10) == pytest.approx(24.0 * 10**1.2)
    bare = ModelCard(kind="cnf", hyper={"method": "dopri5"})
    no_table = ServedModel("m", "v", "cnf", "density", bare, adapter=None, default_tol=1e-3, device="cpu")
    assert no_table.expected_nfe("dopri5", 1e-3) is None


def test_batch_gauges_follow_the_running_batch_and_empty_when_idle(server, client):
    import threading
    import time

    def batch_gauges() -> tuple[float, float]:
        metrics = scrape(server.metrics_url)
        return (
            value(metrics, "odeserve_running_batch_size", model=CLASSIFIER),
            value(metrics, "odeserve_batch_occupancy_ratio", model=CLASSIFIER),
        )

    images = np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8)  # noise: many steps
    busy = threading.Thread(target=client.classify, args=(images,), kwargs=dict(model=CLASSIFIER, tol=1e-6))
    busy.start()
    seen = []
    while busy.is_alive():
        seen.append(batch_gauges())
        time.sleep(0.05)
    busy.join()
    assert any(0 < size <= 32 and occupancy == size / 256 for size, occupancy in seen), seen[
        :20
    ]  # default max_batch 256
    end = time.monotonic() + 5
    while batch_gauges() != (0, 0) and time.monotonic() < end:
        time.sleep(0.05)
    assert batch_gauges() == (0, 0)


def test_calls_about_no_model_are_not_counted_as_unknown_models(server, client):
    """ListModels (and Open Inference's server calls) name no model: model="none", so
    model="unknown" keeps meaning requests for models that are not served."""
    import grpc

    from server.oip import grpc_predict_v2_pb2 as oip
    from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    before = scrape(server.metrics_url)
    client.models()
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(oip.ServerLiveRequest(), timeout=10)
        stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
    after = scrape(server.metrics_url)

    def grew(**labels) -> float:
        return value(after, "odeserve_requests_total", **labels) - value(before, "odeserve_requests_total", **labels)

    assert grew(model="none", rpc="ListModels", code="OK") == 1
    assert grew(model="none", rpc="ServerLive", code="OK") == 1
    assert grew(model="none", rpc="RepositoryIndex", code="OK") == 1
    assert grew(model="unknown") == 0
