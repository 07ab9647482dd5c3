"""End to end through the SDK against a real server on the shipped checkpoints."""

import asyncio

import grpc
import numpy as np
import pytest
import torch
from live_server import CLASSIFIER, DENSITIES

from client import OdeServeError
from client.aio import AsyncClient
from neuralode.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    from training.data import load_mnist

    return load_mnist(mnist_dir, train=False, download=False)


def test_classification_matches_the_model_in_process(client, shipped, mnist_test):
    images = mnist_test.images[:64, 0].numpy()
    result = client.classify(images, model=CLASSIFIER, tol=1e-3)
    model = load_checkpoint(shipped / f"{CLASSIFIER}.pt").model
    with torch.no_grad():
        logits, solution = model(torch.from_numpy(images[:, None]).float() / 255, rtol=1e-3, atol=1e-3)
    expected = torch.softmax(logits, 1).numpy()
    assert result.items.all_succeeded
    np.testing.assert_array_equal(result.items.nfe, solution.nfe.numpy())  # the card's first step, served too
    np.testing.assert_array_equal(result.labels, expected.argmax(1))
    np.testing.assert_allclose(result.probabilities, expected, atol=2e-3)
    assert (result.labels == mnist_test.labels[:64].numpy()).mean() > 0.95
    assert result.timing.compute_seconds > 0 and result.timing.queue_seconds >= 0


def test_nfe_falls_as_the_tolerance_rises(client, mnist_test):
    images = mnist_test.images[:16, 0].numpy()
    nfe = [client.classify(images, model=CLASSIFIER, tol=tol).items.nfe.mean() for tol in (1e-5, 1e-3, 1e-1)]
    assert nfe[0] > nfe[1] > nfe[2]


def test_float_images_in_either_layout_give_the_same_answer(client, mnist_test):
    images = mnist_test.images[:4].numpy()
    as_uint8 = client.classify(images[:, 0], model=CLASSIFIER, tol=1e-2)
    as_float = client.classify(images.astype(np.float32) / 255, model=CLASSIFIER, tol=1e-2)
    np.testing.assert_allclose(as_uint8.probabilities, as_float.probabilities, atol=1e-6)


@pytest.mark.parametrize("model", DENSITIES)
def test_sampling_is_reproducible_and_log_density_agrees(client, model):
    first = client.sample(64, model=model, tol=1e-5, seed=7)
    again = client.sample(64, model=model, tol=1e-5, seed=7)
    other = client.sample(64, model=model, tol=1e-5, seed=8)
    np.testing.assert_array_equal(first.points, again.points)
    assert not np.allclose(first.points, other.points)
    assert first.points.shape == (64, 2) and first.log_density.shape == (64,)
    density = client.log_density(first.points, model=model, tol=1e-5)
    np.testing.assert_allclose(density.log_density, first.log_density, atol=2e-3)


def test_model_cards_are_listed(client):
    models = {m.name: m for m in client.models()}
    assert set(models) >= {CLASSIFIER, *DENSITIES}
    assert models[CLASSIFIER].task == "classify" and models[CLASSIFIER].kind == "odenet"
    assert models[CLASSIFIER].card["metrics"]["test_error"] <= 0.015
    assert client.model(DENSITIES[0]).task == "density"
    with pytest.raises(OdeServeError) as error:
        client.model("no-such-model")
    assert error.value.code == "NOT_FOUND"


def test_health_overall_and_per_model(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "odeserve.v1.Inference", CLASSIFIER, *DENSITIES):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "odeserve.v1.Inference" in set(database.get_services())
        service = DescriptorPool(database).FindServiceByName("odeserve.v1.Inference")
        assert {m.name for m in service.methods} == {"Classify", "Sample", "LogDensity", "ListModels", "GetModel"}


def test_asyncio_client(server, mnist_test):
    async def run():
        async with AsyncClient(server.target, timeout_s=60) as client:
            images = mnist_test.images[:8, 0].numpy()
            results = await asyncio.gather(
                client.classify(images, model=CLASSIFIER, tol=1e-2),
                client.sample(8, model=DENSITIES[0], tol=1e-3, seed=1),
                client.models(),
            )
            with pytest.raises(OdeServeError) as error:
                await client.classify(images, model=CLASSIFIER, tol=2.0)
            return results, error.value

    (classified, sampled, models), error = asyncio.run(run())
    assert classified.labels.shape == (8,) and sampled.points.shape == (8, 2) and len(models) >= 3
    assert error.code == "INVALID_ARGUMENT" and "accuracy.tol" in error.message


def test_a_call_without_a_deadline_is_served(server):
    from client import Client

    with Client(server.target) as client:  # no timeout_s: gRPC sends no deadline at all
        assert client.log_density(np.zeros((2, 2), np.float32), model=DENSITIES[0], tol=1e-3).items.all_succeeded
