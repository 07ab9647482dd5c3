"""Replicas behind one name: gRPC keeps a connection for as long as it can, so spreading load
needs client-side round_robin, and a server-side connection age so clients pick up replicas
added later (deploy/k8s/README.md)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_server import DENSITIES, metric, start_server

from client import Client


@pytest.fixture(scope="module")
def replicas(density_only, tmp_path_factory):
    servers = [start_server(density_only, tmp_path_factory.mktemp(f"replica{i}")) for i in range(2)]
    yield servers
    for server in servers:
        assert server.stop() == 0


def _served(replicas) -> list[float]:
    return [metric(r.metrics_url, "odeserve_requests_total", rpc="Sample", code="OK") for r in replicas]


@pytest.mark.parametrize("policy", ["round_robin", "pick_first"])
def test_round_robin_spreads_calls_over_every_replica(replicas, policy):
    before = _served(replicas)
    target = "ipv4:" + ",".join(r.target for r in replicas)
    with Client(target, timeout_s=60, load_balancing=policy) as client:
        for seed in range(20):
            client.sample(1, model=DENSITIES[0], tol=1e-2, seed=seed)
    counts = sorted(after - first for after, first in zip(_served(replicas), before))
    # round_robin alternates over the connected replicas; the very first calls may find one
    # still connecting.
    assert (counts[0] >= 7) if policy == "round_robin" else (counts == [0, 20]), counts


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="round_robin"):
        Client("127.0.0.1:1", load_balancing="random")


def _states_after_one_call(target: str, watch_s: float) -> list[grpc.ChannelConnectivity]:
    states: list[grpc.ChannelConnectivity] = []
    lock = threading.Lock()
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        channel.subscribe(lambda state: lock.acquire() and (states.append(state), lock.release()))
        time.sleep(watch_s)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
    with lock:
        return list(states)


def test_connections_are_closed_after_the_maximum_age(density_only, tmp_path, replicas):
    aging = start_server(density_only, tmp_path, "--max-connection-age-s", "1")
    try:
        aged = _states_after_one_call(aging.target, watch_s=3.0)
    finally:
        assert aging.stop() == 0
    assert grpc.ChannelConnectivity.IDLE in aged[1:], aged  # the server sent GOAWAY; the next call reconnected
    kept = _states_after_one_call(replicas[0].target, watch_s=3.0)  # max_connection_age_s defaults to 0: never
    assert kept == [grpc.ChannelConnectivity.READY], kept
