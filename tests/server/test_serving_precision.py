"""Precision on every request: ``auto`` serves bfloat16 only where the model card measured it
giving float32's answers, an explicit ``bfloat16`` the server does not serve is refused, and the
response and the metrics say which precision was used. The servers run with ``bfloat16 on``
(or ``off``), so the tests mean the same on CPUs with and without bfloat16 units."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import torch
from live_server import CLASSIFIER, DENSITIES, metric, start_server

from client import Client, OdeServeError
from neuralode.card import PrecisionRow
from neuralode.checkpoint import load_checkpoint, save_checkpoint
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc
from server.adapters import Limits, adapter_for
from server.api import Kind
from server.executor import Executor, Work, step_cost
from server.oip import grpc_predict_v2_pb2 as oip
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from server.scheduling import Plan, Scheduler, SchedulerConfig

TABLED = "odenet-bf16"
DENSITY = DENSITIES[1]
FLOOR = 1e-3  # the card below: bfloat16 matched float32 from 1e-3 up, not at 1e-4


def _precision_table(floor: float) -> list[dict]:
    rows = []
    for tol in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        row = {"tol": tol, "test_error": 0.01, "nfe_mean": 20.0, "nfe_max": 26, "time_per_1000_s": 1.0}
        rows += [{**row, "precision": "float32"}, {**row, "precision": "bfloat16", "matches_float32": tol >= floor}]
    return rows


@pytest.fixture(scope="module")
def folder(shipped, tmp_path_factory):
    """The shipped ODE-Net (its card: bfloat16 matched float32 only at tol 1) and the same
    weights whose card allows bfloat16 from FLOOR up."""
    folder = tmp_path_factory.mktemp("precision")
    for name in (CLASSIFIER, DENSITY):
        shutil.copy(shipped / f"{name}.pt", folder / f"{name}.pt")
    checkpoint = load_checkpoint(shipped / f"{CLASSIFIER}.pt")
    rows = tuple(PrecisionRow.from_dict(row, "precision_table") for row in _precision_table(FLOOR))
    card = checkpoint.card.replace(metrics=checkpoint.card.metrics.replace(precision_table=rows))
    save_checkpoint(folder / f"{TABLED}.pt", checkpoint.model, card)
    return folder


@pytest.fixture(scope="module")
def served(folder, tmp_path_factory):
    running = start_server(folder, tmp_path_factory.mktemp("served"), "--bfloat16", "on")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def digits(mnist_test_digits):
    images, labels = mnist_test_digits
    return images[:64], labels[:64]


@pytest.mark.parametrize(
    ("model", "tol", "asked", "used"),
    [
        (TABLED, 1e-2, None, "bfloat16"),  # auto, at a tolerance the card allows
        (TABLED, FLOOR, "auto", "bfloat16"),
        (TABLED, 5e-4, None, "float32"),  # tighter than the card allows
        (TABLED, 1e-4, None, "float32"),
        (CLASSIFIER, 1e-1, None, "float32"),  # the shipped card: bfloat16 took more NFE from 1e-1 down
        (CLASSIFIER, 1.0, None, "bfloat16"),  # and matched float32 at tol 1
        (CLASSIFIER, 1e-1, "bfloat16", "bfloat16"),  # asked for: served (the server's bfloat16 is on)
        (TABLED, 1e-2, "float32", "float32"),
    ],
)
def test_auto_serves_bfloat16_only_where_the_card_allows_and_says_which(served, digits, model, tol, asked, used):
    images, labels = digits
    with Client(served.target, timeout_s=120) as client:
        result = client.classify(images[:8], model=model, tol=tol, precision=asked)
    assert result.solved.precision == used
    assert (result.labels == labels[:8]).mean() >= 7 / 8


def test_bfloat16_answers_match_float32_on_real_digits(served, digits):
    images, labels = digits
    with Client(served.target, timeout_s=300) as client:
        exact = client.classify(images, model=CLASSIFIER, tol=1e-2, precision="float32")
        low = client.classify(images, model=CLASSIFIER, tol=1e-2, precision="bfloat16")
    assert low.solved.precision == "bfloat16" and exact.solved.precision == "float32"
    assert (low.labels != exact.labels).sum() <= 1
    assert np.abs(low.probabilities - exact.probabilities).max() < 0.05
    # The shipped ODE-Net takes more NFE in bfloat16 at tight tolerances (docs/solvers.md,
    # "Precision"): 7% at 1e-2 in its card's precision table.
    assert abs(low.items.nfe.mean() - exact.items.nfe.mean()) <= 0.15 * exact.items.nfe.mean()


def test_a_cnf_samples_and_evaluates_densities_in_bfloat16(served):
    with Client(served.target, timeout_s=300) as client:
        reference = client.sample(64, model=DENSITY, seed=3, tol=1e-6, precision="float32")
        exact = client.sample(64, model=DENSITY, seed=3, tol=1e-2, precision="float32")
        low = client.sample(64, model=DENSITY, seed=3, tol=1e-2, precision="bfloat16")
        backs = [client.log_density(r.points, model=DENSITY, tol=1e-5, precision="float32") for r in (low, exact)]
        automatic = client.sample(8, model=DENSITY, seed=3, tol=1e-1)  # its card: bfloat16 matched nowhere
    assert low.solved.precision == "bfloat16" and exact.solved.precision == "float32"
    assert automatic.solved.precision == "float32"
    # The same base draws: bfloat16's samples are about as far from a tight solve's as float32's at this tolerance.
    error_low, error_exact = (np.linalg.norm(r.points - reference.points, axis=1).mean() for r in (low, exact))
    assert error_low <= 2 * error_exact + 0.01, (error_low, error_exact)
    # And what each says of its own points' density, against a tight solve back from them.
    density_low, density_exact = (np.abs(r.log_density - b.log_density).mean() for r, b in zip((low, exact), backs))
    assert density_low <= 2 * density_exact + 0.01, (density_low, density_exact)


def test_metrics_count_requests_and_items_by_precision(served, digits):
    images, _ = digits
    before = metric(served.metrics_url, "odeserve_items_total", model=TABLED, precision="bfloat16")
    with Client(served.target, timeout_s=120) as client:
        client.classify(images[:3], model=TABLED, tol=1e-1)
    assert metric(served.metrics_url, "odeserve_items_total", model=TABLED, precision="bfloat16") == before + 3
    assert metric(served.metrics_url, "odeserve_requests_total", model=TABLED, precision="bfloat16", code="OK") >= 1


def test_an_unknown_precision_is_invalid_in_both_protocols(served):
    image = np.zeros((1, 28, 28), np.uint8)
    with grpc.insecure_channel(served.target) as channel:
        request = pb.ClassifyRequest(
            model=CLASSIFIER,
            accuracy=pb.Accuracy(precision="fp16"),
            images=pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=image.tobytes()),
        )
        with pytest.raises(grpc.RpcError) as v1:
            pb_grpc.InferenceStub(channel).Classify(request, timeout=30)
        infer = oip.ModelInferRequest(model_name=CLASSIFIER)
        infer.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
        infer.raw_input_contents.append(image.tobytes())
        infer.parameters["precision"].string_param = "fp16"
        with pytest.raises(grpc.RpcError) as open_inference:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=30)
    assert v1.value.code() is open_inference.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert v1.value.details() == "accuracy.precision must be one of auto, float32, bfloat16 (empty: auto), got 'fp16'"
    assert open_inference.value.details() == v1.value.details().replace("accuracy.", "parameters.")


def test_a_server_without_bfloat16_refuses_it_and_auto_stays_float32(folder, digits, tmp_path):
    images, _ = digits
    running = start_server(folder, tmp_path, "--bfloat16", "off")
    try:
        with Client(running.target, timeout_s=120) as client:
            with pytest.raises(OdeServeError) as refused:
                client.classify(images[:1], model=TABLED, tol=1e-1, precision="bfloat16")
            assert client.classify(images[:1], model=TABLED, tol=1e-1).solved.precision == "float32"
    finally:
        assert running.stop() == 0
    assert refused.value.code == "FAILED_PRECONDITION"
    assert "accuracy.precision 'bfloat16' is not served here: the server's bfloat16 setting is off" in str(
        refused.value
    )


def _served(adapter, works: list[Work]) -> list:
    """Each work's outcome from a fresh executor stepping them all together to their ends."""
    executor = Executor(adapter, torch.device("cpu"))
    items = Scheduler(SchedulerConfig(max_batch=64, max_queued=64)).submit(works, cost=step_cost("dopri5")).items
    outcomes, plan = {}, Plan(join=items)
    while len(outcomes) < len(items):
        outcomes.update(executor.step(plan).finished)
        plan = Plan()
    return [outcomes[item.id] for item in items]


def test_rows_in_bfloat16_take_in_a_batch_the_steps_they_take_alone(shipped, digits):
    """Within a precision, a row's NFE and answer do not depend on the rows beside it."""
    images, _ = digits
    adapter = adapter_for(load_checkpoint(shipped / f"{CLASSIFIER}.pt").model)
    rows = adapter.prepare(Kind.CLASSIFY, {"images": images[:6]}, Limits(max_items=64, max_abs_input=1e6))
    works = [
        Work(Kind.CLASSIFY, row, tol, tol, "dopri5", 10_000, "bfloat16")
        for row, tol in zip(rows, (1e-1, 1e-3, 1e-1, 1e-2, 1e-3, 1e-1))
    ]
    together = _served(adapter, works)
    alone = [_served(adapter, [work])[0] for work in works]
    assert [o.nfe for o in together] == [o.nfe for o in alone]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.outputs["probabilities"], b.outputs["probabilities"], atol=2e-2, rtol=0)


def test_served_bfloat16_rows_take_the_steps_of_the_models_own_bfloat16_solve(shipped, digits):
    """The engine evaluates f(t0, y0) and the first-step probe in float32, as the model's own
    solve (what the card's precision table measured) does: the same NFE, digit by digit. (When
    the engine's timing wrapper hid f's float32 version, 2 of these 32 digits took 20 NFE
    served against 14.)"""
    images, _ = digits
    model = load_checkpoint(shipped / f"{CLASSIFIER}.pt").model
    adapter = adapter_for(model)
    rows = adapter.prepare(Kind.CLASSIFY, {"images": images[:32]}, Limits(max_items=64, max_abs_input=1e6))
    works = [Work(Kind.CLASSIFY, row, 1e-1, 1e-1, "dopri5", 10_000, "bfloat16") for row in rows]
    outcomes = _served(adapter, works)
    with torch.no_grad():
        logits, solution = model(rows, rtol=1e-1, atol=1e-1, precision="bfloat16")
    assert [outcome.nfe for outcome in outcomes] == solution.nfe.tolist()
    served = torch.stack([outcome.outputs["probabilities"] for outcome in outcomes])
    torch.testing.assert_close(served, torch.softmax(logits.float(), dim=1), atol=1e-2, rtol=0)
