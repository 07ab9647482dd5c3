"""Fixtures: the shipped checkpoints and servers started on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from live_server import CLASSIFIER, DENSITIES, SHIPPED, RunningServer, start_server


@pytest.fixture(scope="session")
def shipped() -> Path:
    missing = [name for name in (CLASSIFIER, *DENSITIES) if not (SHIPPED / f"{name}.pt").exists()]
    if missing:
        raise FileNotFoundError(f"shipped checkpoints missing from {SHIPPED}: {missing} (train them: see README)")
    return SHIPPED


@pytest.fixture(scope="session")
def density_only(shipped, tmp_path_factory) -> Path:
    """A checkpoints folder with one small CNF: servers that start fast, for tests of the
    transport rather than the models."""
    folder = tmp_path_factory.mktemp("density-only")
    shutil.copy(shipped / f"{DENSITIES[0]}.pt", folder / f"{DENSITIES[0]}.pt")
    return folder


@pytest.fixture(scope="session")
def server(shipped, tmp_path_factory) -> RunningServer:
    """The default server on the shipped checkpoints, shared by the tests that only read."""
    running = start_server(shipped, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(server):
    from client import Client

    with Client(server.target, timeout_s=120) as connection:
        yield connection
