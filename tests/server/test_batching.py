"""Continuous batching: items of any request and tolerance share solver steps, yet each item
gets exactly its own solve; a loose request is never held back by a tight one."""

import threading
import time

import numpy as np
import pytest
import torch
from live_server import CLASSIFIER, start_server

from client import Client
from neuralode.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def images(mnist_dir):
    from training.data import load_mnist

    return load_mnist(mnist_dir, train=False, download=False).images[:64, 0].numpy()


def _concurrently(calls):
    """Run calls in threads, each after its delay; return (result, finish time) per call."""
    results = [None] * len(calls)

    def run(i, delay, call):
        time.sleep(delay)
        value = call()
        results[i] = (value, time.monotonic())

    threads = [threading.Thread(target=run, args=(i, d, c)) for i, (d, c) in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def test_mixed_tolerances_in_one_batch_equal_each_item_alone(server, shipped, images):
    tight, loose = images[:6], images[6:12]
    with Client(server.target, timeout_s=120) as client:
        (tight_result, _), (loose_result, _) = _concurrently(
            [
                (0.0, lambda: client.classify(tight, model=CLASSIFIER, tol=1e-5)),
                (0.0, lambda: client.classify(loose, model=CLASSIFIER, tol=1e-1)),
            ]
        )
    model = load_checkpoint(shipped / f"{CLASSIFIER}.pt").model
    for batch, result, tol in ((tight, tight_result, 1e-5), (loose, loose_result, 1e-1)):
        for i, image in enumerate(batch):
            with torch.no_grad():
                logits, solution = model(torch.from_numpy(image[None, None]).float() / 255, rtol=tol, atol=tol)
            assert int(result.items.nfe[i]) == int(solution.nfe[0])
            np.testing.assert_allclose(result.probabilities[i], torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert tight_result.items.nfe.min() > loose_result.items.nfe.max()


def _race(target: str, images: np.ndarray) -> tuple[float, float]:
    """A tight request first, a loose one 0.3 s later: when did each finish?"""
    with Client(target, timeout_s=300) as client:
        (_, tight_done), (_, loose_done) = _concurrently(
            [
                (0.0, lambda: client.classify(images, model=CLASSIFIER, tol=1e-7)),
                (0.3, lambda: client.classify(images[:8], model=CLASSIFIER, tol=1e-1)),
            ]
        )
    return tight_done, loose_done


def test_a_loose_request_overtakes_a_tight_one_that_arrived_first(server, images):
    tight_done, loose_done = _race(server.target, images)
    assert loose_done < tight_done


def test_static_batching_makes_the_loose_request_wait(shipped, images, tmp_path):
    static = start_server(shipped, tmp_path, "--policy", "static", "--max-delay-ms", "20")
    try:
        tight_done, loose_done = _race(static.target, images)
    finally:
        assert static.stop() == 0
    assert loose_done > tight_done


def test_a_server_with_step_graphs_gives_each_item_its_own_solve(shipped, images, tmp_path):
    """``--step-graphs on`` (the GPU engine's masked steps per padded batch size; eager here):
    concurrent requests at two tolerances come back as each image solved alone."""
    running = start_server(shipped, tmp_path, "--step-graphs", "on")
    try:
        with Client(running.target, timeout_s=120) as client:
            (tight, _), (loose, _) = _concurrently(
                [
                    (0.0, lambda: client.classify(images[:5], model=CLASSIFIER, tol=1e-4)),
                    (0.05, lambda: client.classify(images[5:8], model=CLASSIFIER, tol=1e-1)),
                ]
            )
    finally:
        running.stop()
    model = load_checkpoint(shipped / f"{CLASSIFIER}.pt").model
    for batch, result, tol in ((images[:5], tight, 1e-4), (images[5:8], loose, 1e-1)):
        for i, image in enumerate(batch):
            with torch.no_grad():
                logits, solution = model(torch.from_numpy(image[None, None]).float() / 255, rtol=tol, atol=tol)
            assert int(result.items.nfe[i]) == int(solution.nfe[0])
            np.testing.assert_allclose(result.probabilities[i], torch.softmax(logits, 1)[0].numpy(), atol=1e-5)


def test_step_graphs_takes_on_or_off_only(capsys):
    from server.config import parse_config

    assert parse_config(["--step-graphs", "on"]).step_graphs == "on"
    with pytest.raises(SystemExit):
        parse_config(["--step-graphs", "yes"])
    assert "step_graphs must be off or on, got 'yes'" in capsys.readouterr().err
