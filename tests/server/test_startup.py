"""Starting ``python -m server`` where it cannot serve: a port in use (gRPC or /metrics), no
checkpoints. Each is a one-line message naming the flag to change and a non-zero exit, never a
traceback, and never a second server quietly sharing a busy port (gRPC's default SO_REUSEPORT)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import DENSITIES, ROOT, start_server

from client import Client

DENSITY = DENSITIES[0]


def run_server(*flags: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """``python -m server`` expected to refuse to start (killed, and the test failed, if it serves);
    HTTP on a free port unless ``flags`` say otherwise."""
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--http-port", "0", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the server started instead of refusing:\n{out}\n{err[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one line a refusal prints (after the settings it logs); no traceback, exit 1."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "odeserve ready" not in result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def listening():
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_second_server_on_a_busy_port_refuses_to_start_and_the_first_keeps_all_traffic(density_only, tmp_path):
    first = start_server(density_only, tmp_path)
    try:
        port = first.target.rsplit(":", 1)[1]
        line = refusal(run_server("--checkpoints", str(density_only), "--port", port, "--metrics-port", "0"))
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in line and "--port" in line, line
        with Client(first.target, timeout_s=30) as client:
            assert client.health() and [m.name for m in client.models()] == [DENSITY]
    finally:
        assert first.stop() == 0


def test_a_grpc_port_held_by_another_program_is_one_line(density_only, listening):
    line = refusal(run_server("--checkpoints", str(density_only), "--port", str(listening), "--metrics-port", "0"))
    assert f"127.0.0.1:{listening}: the port is in use" in line and "choose another with --port" in line, line


def test_a_busy_metrics_port_is_one_line_naming_metrics_port(density_only, listening):
    line = refusal(run_server("--checkpoints", str(density_only), "--port", "0", "--metrics-port", str(listening)))
    assert f"127.0.0.1:{listening}: the port is in use" in line and "--metrics-port" in line, line


def test_a_busy_http_port_is_one_line_naming_http_port(density_only, listening):
    line = refusal(
        run_server(
            "--checkpoints", str(density_only), "--port", "0", "--metrics-port", "0", "--http-port", str(listening)
        )
    )
    assert f"127.0.0.1:{listening}: the port is in use" in line and "--http-port" in line, line


def test_reuse_port_on_lets_servers_share_a_port_deliberately(density_only, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = start_server(density_only, tmp_path / "a", "--reuse-port", "on")
    try:
        port = first.target.rsplit(":", 1)[1]
        second = start_server(density_only, tmp_path / "b", "--reuse-port", "on", "--port", port)
        assert second.stop() == 0
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("where", ["missing", "file", "empty"])
def test_no_models_to_serve_exits_with_a_clear_message(tmp_path, where):
    folder = {"missing": tmp_path / "no-such-dir", "file": tmp_path / "model.pt", "empty": tmp_path}[where]
    if where == "file":
        folder.write_bytes(Path(ROOT / "checkpoints" / f"{DENSITY}.pt").read_bytes())
    line = refusal(run_server("--checkpoints", str(folder), "--port", "0", "--metrics-port", "0"))
    assert f"--checkpoints {folder}: " in line and "no models to serve" in line, line
