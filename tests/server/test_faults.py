"""Faults against real server processes: SIGTERM and SIGKILL under load, bad checkpoints in the
served folder, and reloading checkpoints (SIGHUP) without downtime."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from live_server import CLASSIFIER, DENSITIES, metric, start_server

from client import Client, OdeServeError
from neuralode.checkpoint import load_checkpoint

DENSITY = DENSITIES[0]
POINTS = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Load:
    """Closed-loop clients calling until stopped; every call's outcome and duration recorded."""

    def __init__(self, target: str, clients: int, timeout_s: float, retries: int, call) -> None:
        self.outcomes: list[tuple[float, float, str]] = []  # (end time, seconds, "OK" or status code)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(target, timeout_s, retries, call, i)) for i in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, target: str, timeout_s: float, retries: int, call, index: int) -> None:
        with Client(target, timeout_s=timeout_s, retries=retries) as client:
            while not self._stop.is_set():
                begin = time.monotonic()
                try:
                    call(client, index)
                    outcome = "OK"
                except OdeServeError as error:
                    outcome = error.code
                with self._lock:
                    self.outcomes.append((time.monotonic(), time.monotonic() - begin, outcome))

    def successes_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for end, _, outcome in self.outcomes if end > moment and outcome == "OK")

    def stop(self, timeout: float = 60.0) -> Counter:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"
        return Counter(outcome for _, _, outcome in self.outcomes)


def density_call(client: Client, index: int) -> None:
    result = client.log_density(POINTS, model=DENSITY, tol=(1e-2, 1e-4)[index % 2])
    assert result.items.all_succeeded and np.isfinite(result.log_density).all()


def test_sigterm_under_load_loses_no_accepted_request(density_only, tmp_path):
    running = start_server(density_only, tmp_path, "--grace-seconds", "20")
    load = Load(running.target, clients=16, timeout_s=60, retries=3, call=density_call)
    try:
        time.sleep(2.0)
        begin = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(30) == 0
        assert time.monotonic() - begin < 20
    finally:
        running.stop(signal.SIGKILL)
        outcomes = load.stop()
    # Every call either completed with all items solved or was refused (UNAVAILABLE) before
    # the server took it: nothing was cut off, expired or failed inside. (Calls gRPC had
    # received but not dispatched when it stopped come back CANCELLED, which the SDK retries.)
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes["OK"] > 16


def test_sigkill_then_restart_clients_surface_unavailable_and_recover(density_only, tmp_path):
    port = free_port()
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
    first = start_server(density_only, tmp_path / "first", "--port", str(port))
    load = Load(first.target, clients=4, timeout_s=10, retries=3, call=density_call)
    second = None
    try:
        time.sleep(1.5)
        first.process.kill()
        first.process.wait(10)
        killed_at = time.monotonic()
        time.sleep(3.0)  # clients now meet a dead port
        second = start_server(density_only, tmp_path / "second", "--port", str(port))
        back_at = time.monotonic()
        deadline = back_at + 30
        while time.monotonic() < deadline:
            if load.successes_since(back_at) >= 8:
                break
            time.sleep(0.2)
    finally:
        outcomes = load.stop()
        if second is not None:
            assert second.stop() == 0
    during = Counter(outcome for end, _, outcome in load.outcomes if killed_at < end < back_at)
    after = [(end, outcome) for end, _, outcome in load.outcomes if end > back_at]
    assert during and set(during) == {"UNAVAILABLE"}, during
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert max(seconds for _, seconds, _ in load.outcomes) < 10 + 1  # nobody hangs past its deadline
    assert sum(outcome == "OK" for _, outcome in after) >= 8
    first_ok = min(end for end, outcome in after if outcome == "OK")
    assert first_ok - back_at < 10, "clients took too long to reconnect"


def write_bad_checkpoints(folder: Path, good: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path(folder / "pwned").write_text, ("the payload ran",))

    torch.save({"format": "x", "state_dict": Payload()}, folder / "malicious.pt")
    (folder / "pickle.pt").write_bytes(pickle.dumps(Payload()))
    (folder / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (folder / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 64)
    checkpoint = torch.load(good, weights_only=True)
    first_weight = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first_weight] = torch.zeros(3, 3)
    torch.save(checkpoint, folder / "wrong-shapes.pt")
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["card"] = checkpoint["card"].replace('"kind": "cnf"', '"kind": "odenet"')
    torch.save(checkpoint, folder / "card-mismatch.pt")


def test_bad_checkpoints_are_refused_with_a_reason_and_the_others_serve(shipped, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(shipped / f"{DENSITY}.pt", folder / f"{DENSITY}.pt")
    write_bad_checkpoints(folder, shipped / f"{DENSITY}.pt")
    running = start_server(folder, tmp_path)
    try:
        with Client(running.target, timeout_s=30) as client:
            assert [m.name for m in client.models()] == [DENSITY]
            assert client.log_density(POINTS, model=DENSITY, tol=1e-3).items.all_succeeded
            with pytest.raises(OdeServeError) as error:
                client.log_density(POINTS, model="malicious", tol=1e-3)
            assert error.value.code == "NOT_FOUND"
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    for name in ("malicious", "pickle", "truncated", "garbage", "wrong-shapes", "card-mismatch"):
        assert f"not serving {name}.pt: " in log, name
    assert not (folder / "pwned").exists(), "unpickling ran code from a checkpoint"


def with_card(source: Path, destination: Path, change) -> None:
    """A copy of ``source`` (valid weights) whose model card ``change`` edits."""
    checkpoint = torch.load(source, weights_only=True)
    card = json.loads(checkpoint["card"])
    change(card)
    checkpoint["card"] = json.dumps(card)
    torch.save(checkpoint, destination)


MALFORMED_CARDS = {
    "tol-abc": (DENSITY, lambda card: card["training"].update(tol="abc")),
    "table-tol-x": (DENSITY, lambda card: card["metrics"]["table"][0].update(tol="x")),
    "training-list": (DENSITY, lambda card: card.update(training=[])),
    "channels-2048": (CLASSIFIER, lambda card: card["hyper"].update(channels=2048)),
}


def write_malformed_cards(folder: Path, shipped: Path) -> None:
    for name, (source, change) in MALFORMED_CARDS.items():
        with_card(shipped / f"{source}.pt", folder / f"{name}.pt", change)


def test_malformed_model_cards_are_skipped_and_named_and_the_others_serve(shipped, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(shipped / f"{DENSITY}.pt", folder / f"{DENSITY}.pt")
    write_malformed_cards(folder, shipped)
    running = start_server(folder, tmp_path)
    try:
        with Client(running.target, timeout_s=30) as client:
            assert [m.name for m in client.models()] == [DENSITY]
            assert client.log_density(POINTS, model=DENSITY, tol=1e-3).items.all_succeeded
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    for name, field in [
        ("tol-abc", "card.training.tol"),
        ("table-tol-x", "card.metrics.table[0].tol"),
        ("training-list", "card.training must be an object"),
        ("channels-2048", "weights do not match the model card"),
    ]:
        assert f"not serving {name}.pt: " in log and field in log, name


def test_sighup_applies_the_rest_of_a_reload_beside_a_malformed_card(shipped, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(shipped / f"{DENSITY}.pt", folder / f"{DENSITY}.pt")
    running = start_server(folder, tmp_path)
    try:
        with Client(running.target, timeout_s=30) as client:
            write_malformed_cards(folder, shipped)
            shutil.copy(shipped / f"{DENSITIES[1]}.pt", folder / "new-density.pt")
            running.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while "reloaded" not in running.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(m.name for m in client.models()) == sorted([DENSITY, "new-density"])
            assert client.log_density(POINTS, model="new-density", tol=1e-3).items.all_succeeded
            assert client.log_density(POINTS, model=DENSITY, tol=1e-3).items.all_succeeded
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    for name in MALFORMED_CARDS:
        assert f"not serving {name}.pt: " in log, name


def retrained_copy(source: Path, destination: Path) -> None:
    """The same architecture with other weights, as a retraining would deliver."""
    checkpoint = torch.load(source, weights_only=True)
    bias = checkpoint["state_dict"]["head.4.bias"]
    checkpoint["state_dict"]["head.4.bias"] = bias + 20 * (torch.arange(len(bias)) == 0)  # now it mostly says "0"
    torch.save(checkpoint, destination)


def test_sighup_reloads_without_downtime(shipped, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    served = folder / "digits.pt"
    shutil.copy(shipped / f"{CLASSIFIER}.pt", served)
    retrained_copy(served, tmp_path / "retrained.pt")
    running = start_server(folder, tmp_path, "--max-batch", "256")
    images = np.random.default_rng(1).integers(0, 255, (8, 28, 28), dtype=np.uint8)
    slow_images = np.random.default_rng(2).integers(0, 255, (512, 28, 28), dtype=np.uint8)  # two batches
    try:
        with Client(running.target, timeout_s=120) as client:
            old_version = client.model("digits").version
            before = client.classify(images, model="digits", tol=1e-3)
            in_flight: dict = {}
            thread = threading.Thread(
                target=lambda: in_flight.update(result=client.classify(slow_images, model="digits", tol=1e-7))
            )
            thread.start()
            while metric(running.metrics_url, "odeserve_running_items", model="digits") == 0:
                time.sleep(0.02)
            load = Load(
                running.target,
                clients=4,
                timeout_s=60,
                retries=0,
                call=lambda c, i: c.classify(images[i : i + 1], model="digits", tol=1e-1),
            )
            shutil.copy(tmp_path / "retrained.pt", folder / "digits.tmp")
            (folder / "digits.tmp").replace(served)  # atomically, as a deployment would
            running.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while client.model("digits").version == old_version and time.monotonic() < deadline:
                time.sleep(0.05)
            assert thread.is_alive(), "the slow request finished before the reload; make it slower"
            after = client.classify(images, model="digits", tol=1e-3)
            thread.join(120)
            outcomes = load.stop()
    finally:
        assert running.stop() == 0
    assert set(outcomes) == {"OK"}, outcomes  # no downtime for the clients calling throughout
    assert in_flight["result"].model_version == old_version  # finished on the weights it started with
    assert in_flight["result"].items.all_succeeded
    assert after.model_version != old_version
    with torch.no_grad():
        expected = {}
        for name, path, batch, tol in [
            ("before", shipped / f"{CLASSIFIER}.pt", images, 1e-3),
            ("after", tmp_path / "retrained.pt", images, 1e-3),
            ("slow", shipped / f"{CLASSIFIER}.pt", slow_images[:8], 1e-7),
        ]:
            logits, _ = load_checkpoint(path).model(torch.from_numpy(batch[:, None]).float() / 255, rtol=tol, atol=tol)
            expected[name] = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(before.probabilities, expected["before"], atol=2e-3)
    np.testing.assert_allclose(after.probabilities, expected["after"], atol=2e-3)
    np.testing.assert_allclose(in_flight["result"].probabilities[:8], expected["slow"], atol=2e-3)
    assert np.abs(expected["after"] - expected["before"]).max() > 0.05  # the weights really changed
    assert "reloaded" in running.log.read_text()


def test_a_checkpoint_that_breaks_keeps_its_previous_version_serving(shipped, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    served = folder / "density.pt"
    shutil.copy(shipped / f"{DENSITY}.pt", served)
    running = start_server(folder, tmp_path)
    try:
        with Client(running.target, timeout_s=60) as client:
            version = client.model("density").version
            served.write_bytes(b"truncated in the middle of a copy")
            running.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "not reloading density.pt" not in running.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.model("density").version == version
            assert client.log_density(POINTS, model="density", tol=1e-3).items.all_succeeded
    finally:
        assert running.stop() == 0
    assert f"still serving version {version}" in running.log.read_text()
