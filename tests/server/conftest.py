"""Fixtures: a client of the shared server (the servers themselves: tests/conftest.py) and the
stock Open Inference Protocol client's venv."""

from __future__ import annotations

from pathlib import Path

import pytest
from live_server import stock_client_venv


@pytest.fixture
def client(server):
    from client import Client

    with Client(server.target, timeout_s=120) as connection:
        yield connection


@pytest.fixture(scope="session")
def tritonclient_venv(tmp_path_factory) -> Path:
    """The stock Triton client, both transports (gRPC and HTTP) in one venv: one install for
    the gRPC and the REST tests."""
    return stock_client_venv(tmp_path_factory.mktemp("tritonclient") / "venv", "tritonclient[grpc,http]")
