"""Warm start against real servers: a model is served (health SERVING, routed to) only once its
warm-up solves have run on its worker, at start and on reload; the solves count in no request
metric; ``warmup = off`` skips them; a model whose warm-up fails is not served.

Ordering is made observable without timing: a tiny ODE classifier registered here ("gated-ode")
records every evaluation of f (batch size, whether under autocast) and waits inside f while its
gate file is missing, so a test holds a warm-up solve open for as long as it looks.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from live_server import CLASSIFIER, DENSITIES, RunningServer, scrape, start_server, value
from test_model_kind import TinyODEClassifier
from torch import Tensor

from client import Client, OdeServeError
from neuralode.checkpoint import save_checkpoint
from neuralode.models import CLASSIFY, ModelSpec, register, unregister

KIND = "gated-ode"
GATES = "WARMUP_TEST_GATES"  # the folder of gate files and f's records, in the server's environment
DENSITY = DENSITIES[0]
IMAGES = np.zeros((2, 28, 28), np.uint8)
WAIT_S = 60.0


class GatedClassifier(TinyODEClassifier):
    """TinyODEClassifier whose f appends ``<gate> <batch size> <autocast>`` to ``<gates>/<gate>.calls``
    and then waits until the file ``<gates>/<gate>`` exists; the gate ``nan`` makes f non-finite
    and ``raise`` makes it raise, for failing warm-ups."""

    def __init__(self, width: int = 8, gate: str = "open") -> None:
        super().__init__(width)
        self.gate = gate

    def ode_dynamics(self, t: Tensor, y: Tensor) -> Tensor:
        folder = Path(os.environ[GATES])
        with (folder / f"{self.gate}.calls").open("a") as record:
            record.write(f"{len(y)} {torch.is_autocast_enabled('cpu')}\n")
        if self.gate == "raise":
            raise RuntimeError("these dynamics are broken")
        while not (folder / self.gate).exists():
            time.sleep(0.01)
        out = super().ode_dynamics(t, y)
        return out * float("nan") if self.gate == "nan" else out


def register_kind() -> None:
    register(ModelSpec(KIND, CLASSIFY, GatedClassifier, has_ode=True, adjoint=True, hyper={"width": 8}))


@pytest.fixture(scope="module")
def gated_kind():
    register_kind()  # for save_checkpoint's card here; the server process registers it itself
    yield
    unregister(KIND)


def gated_checkpoint(path: Path, gate: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = GatedClassifier(gate=gate).eval()
    save_checkpoint(path, model, {"kind": KIND, "hyper": {"width": 8, "gate": gate}, "training": {"tol": 1e-3}})


def start_gated(folder: Path, tmp: Path, gates: Path, *flags: str) -> RunningServer:
    code = "import sys, test_warmup; test_warmup.register_kind(); from server.app import main; sys.exit(main())"
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": path, GATES: str(gates)}
    return start_server(folder, tmp, "--max-batch", "8", *flags, python=("-c", code), env=env)


def calls(gates: Path, gate: str) -> list[tuple[int, bool]]:
    """(batch size, under autocast) of every evaluation of f behind ``gate`` so far."""
    path = gates / f"{gate}.calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(size), flag == "True") for size, flag in (line.split() for line in lines)]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def health(client: Client, name: str) -> str:
    try:
        return client.health(name)
    except OdeServeError as error:
        return error.code  # NOT_FOUND: health has no entry for the name


@pytest.fixture
def gates(tmp_path) -> Path:
    folder = tmp_path / "gates"
    folder.mkdir()
    (folder / "open").touch()
    return folder


def test_a_server_is_ready_only_after_warm_up_solves_of_each_precision_and_batch_size(gated_kind, gates, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    gated_checkpoint(folder / "tiny.pt", "held")
    started: dict = {}
    starting = threading.Thread(
        target=lambda: started.update(server=start_gated(folder, tmp_path, gates, "--bfloat16", "on"))
    )
    starting.start()
    try:
        wait_for(lambda: calls(gates, "held"), "the warm-up's first evaluation of f")
        # A server that did not wait for its warm-up would have said it is ready before it began.
        assert starting.is_alive() and "odeserve ready" not in (tmp_path / "server.out").read_text()
        (gates / "held").touch()
        starting.join(WAIT_S)
        running = started["server"]
    finally:
        (gates / "held").touch()
        starting.join(WAIT_S)
    try:
        # f ran for each precision the server serves (bfloat16 under autocast) at batch 1 and max_batch.
        assert {(1, False), (8, False), (1, True), (8, True)} <= set(calls(gates, "held"))
        with Client(running.target, timeout_s=30) as client:
            assert health(client, "tiny") == "SERVING"
            assert client.classify(IMAGES, model="tiny", tol=1e-3).items.all_succeeded
    finally:
        assert running.stop() == 0
    assert "warmed tiny (version " in running.log.read_text()


def test_warm_up_off_serves_at_once_without_solving(gated_kind, gates, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    gated_checkpoint(folder / "tiny.pt", "held")
    running = start_gated(folder, tmp_path, gates, "--warmup", "off")  # the gate is shut: a warm-up would hang
    try:
        assert calls(gates, "held") == []
        with Client(running.target, timeout_s=30) as client:
            assert health(client, "tiny") == "SERVING"
        samples = scrape(running.metrics_url)
        assert not [s for s in samples if s.name == "odeserve_warmup_seconds"]
    finally:
        (gates / "held").touch()
        assert running.stop() == 0
    assert "warmed" not in running.log.read_text()


def test_a_reload_warms_new_and_changed_models_up_while_the_old_serve(gated_kind, gates, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "checkpoints" / f"{DENSITY}.pt", folder / f"{DENSITY}.pt")
    gated_checkpoint(folder / "tiny.pt", "open")
    running = start_gated(folder, tmp_path, gates)
    points = np.zeros((2, 2), np.float32)
    try:
        with Client(running.target, timeout_s=30) as client:
            old_version = client.model("tiny").version
            gated_checkpoint(folder / "tiny.pt", "changed", seed=1)  # a changed model...
            gated_checkpoint(folder / "fresh.pt", "fresh")  # ... and a new one, both held in their warm-up
            running.process.send_signal(signal.SIGHUP)
            wait_for(lambda: calls(gates, "fresh"), "the new model's warm-up")  # models warm up in name order
            assert health(client, "fresh") == "NOT_FOUND"
            assert sorted(m.name for m in client.models()) == [DENSITY, "tiny"]
            with pytest.raises(OdeServeError) as error:
                client.classify(IMAGES, model="fresh", tol=1e-3)
            assert error.value.code == "NOT_FOUND"
            (gates / "fresh").touch()
            wait_for(lambda: calls(gates, "changed"), "the changed model's warm-up")
            assert client.classify(IMAGES, model="tiny", tol=1e-3).model_version == old_version
            assert health(client, "tiny") == "SERVING" and health(client, "fresh") == "NOT_FOUND"
            assert client.log_density(points, model=DENSITY, tol=1e-3).items.all_succeeded
            (gates / "changed").touch()
            wait_for(lambda: "reloaded" in running.log.read_text(), "the reload")
            assert health(client, "fresh") == "SERVING" and health(client, "tiny") == "SERVING"
            assert client.classify(IMAGES, model="tiny", tol=1e-3).model_version != old_version
            assert client.classify(IMAGES, model="fresh", tol=1e-3).items.all_succeeded
    finally:
        for gate in ("open", "fresh", "changed"):
            (gates / gate).touch()
        assert running.stop() == 0
    log = running.log.read_text()
    assert "warmed fresh (version " in log and log.count("warmed tiny (version ") == 2


def test_a_model_whose_warm_up_fails_is_not_served_and_the_others_are(gated_kind, gates, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "checkpoints" / f"{DENSITY}.pt", folder / f"{DENSITY}.pt")
    gated_checkpoint(folder / "nan.pt", "nan")
    gated_checkpoint(folder / "raise.pt", "raise")
    (gates / "nan").touch()
    running = start_gated(folder, tmp_path, gates)
    try:
        with Client(running.target, timeout_s=30) as client:
            assert [m.name for m in client.models()] == [DENSITY]
            assert health(client, DENSITY) == "SERVING"
            assert health(client, "nan") == "NOT_FOUND" and health(client, "raise") == "NOT_FOUND"
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "not serving nan: its warm-up failed: classify in float32 at 1 items: " in log
    assert "not serving raise: its warm-up failed: WorkerFailed: " in log


def test_warm_up_solves_count_in_no_request_metric(shipped, tmp_path):
    running = start_server(shipped, tmp_path)
    try:
        samples = scrape(running.metrics_url)
    finally:
        assert running.stop() == 0
    for model in (CLASSIFIER, *DENSITIES):
        assert value(samples, "odeserve_warmup_seconds", model=model) > 0, model
    for name in (
        "odeserve_requests_total",
        "odeserve_items_total",
        "odeserve_item_nfe_count",
        "odeserve_solver_steps_total",
        "odeserve_batch_steps_total",
        "odeserve_compute_seconds_count",
    ):
        assert value(samples, name) == 0, name
    log = running.log.read_text()
    assert log.index("warmed odenet-mnist (version ") < log.index("serving 3 models on ")
