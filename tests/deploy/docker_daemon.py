"""A Docker engine for the container tests: $DOCKER_HOST when it answers, else ``dockerd``
started here by PID (root only; no bridge, no iptables: containers use the host's network)
and stopped by PID. Its data root lives in the build cache, so a second run reuses the
images it built; CI starts from nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from deploy_tools import require_tool

BUILD_CACHE = Path(os.environ.get("ODESERVE_BUILD_CACHE", Path.home() / ".cache" / "odeserve-build"))


def _answers(env: dict[str, str]) -> bool:
    probe = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


class DockerDaemon:
    """``env`` points the docker CLI at the engine; ``stop()`` ends one started here."""

    def __init__(self) -> None:
        require_tool("docker", "the docker CLI runs the container tests")
        self.process: subprocess.Popen | None = None
        self._exec_root: str | None = None
        self.env = dict(os.environ)
        if os.environ.get("DOCKER_HOST") and _answers(self.env):
            return
        dockerd = require_tool("dockerd", "Debian's docker.io starts an engine for the container tests")
        if os.geteuid() != 0:
            pytest.skip("dockerd cannot start: the container tests start their own engine, which needs root")
        self._exec_root = tempfile.mkdtemp(prefix="odeserve-dockerd-")
        socket = f"{self._exec_root}/docker.sock"
        data_root = BUILD_CACHE / "docker"
        data_root.mkdir(parents=True, exist_ok=True)
        log = BUILD_CACHE / "dockerd.log"
        self.process = subprocess.Popen(
            [
                dockerd,
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                f"--data-root={data_root}",
                f"--exec-root={self._exec_root}/exec",
                f"--pidfile={self._exec_root}/docker.pid",
                f"--host=unix://{socket}",
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.env["DOCKER_HOST"] = f"unix://{socket}"
        end = time.monotonic() + 60
        while time.monotonic() < end and self.process.poll() is None:
            if Path(socket).exists() and _answers(self.env):
                return
            time.sleep(0.2)
        self.stop()
        pytest.skip(f"dockerd cannot start here; its log ({log}) ends:\n{log.read_text()[-2000:]}")

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._exec_root:
            netns = Path(self._exec_root, "exec", "netns", "default")  # dockerd leaves it mounted
            if netns.exists():
                subprocess.run(["umount", str(netns)], capture_output=True, timeout=30, check=False)
            shutil.rmtree(self._exec_root, ignore_errors=True)
