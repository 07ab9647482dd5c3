"""Fixtures: a client of the shared server (the servers themselves: tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def client(server):
    from client import Client

    with Client(server.target, timeout_s=120) as connection:
        yield connection
