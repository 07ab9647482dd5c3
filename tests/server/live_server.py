"""Real servers for the tests: ``python -m server`` in a subprocess on ephemeral ports, and
their /metrics. A plain module (not a conftest) so the deploy tests can import it too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints"
CLASSIFIER = "odenet-mnist"
DENSITIES = ("cnf-8gaussians", "cnf-moons")


def scrape(metrics_url: str) -> list:
    """Every sample on a server's /metrics now (parsed by prometheus_client)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def metric(metrics_url: str, name: str, **labels: str) -> float:
    return value(scrape(metrics_url), name, **labels)


@dataclass
class RunningServer:
    process: subprocess.Popen
    target: str
    metrics_url: str
    log: Path
    http_url: str = ""  # the REST API's root, http://host:port ("" with --http-port -1)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)


def end_on_sigterm() -> None:
    """Make SIGTERM end this process as Ctrl-C does (KeyboardInterrupt), so the ``finally``
    blocks of a script that started servers stop them instead of leaving them running. Call
    it from the main thread, before starting any."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def start_server(
    checkpoints: Path,
    tmp: Path,
    *flags: str,
    timeout: float = 120.0,
    env: dict | None = None,
    python: tuple[str, ...] = ("-m", "server"),
) -> RunningServer:
    """``python -m server`` on free ports (``flags`` come last, so ``--port N`` wins);
    ``python``: the interpreter's arguments before the flags (``-c`` code that registers a
    model kind, then runs ``server.app.main``, say)."""
    out, log = tmp / "server.out", tmp / "server.log"
    process = subprocess.Popen(
        [
            sys.executable,
            *python,
            *("--checkpoints", str(checkpoints), "--port", "0", "--metrics-port", "0", "--http-port", "0"),
            *flags,
        ],
        cwd=ROOT,
        stdout=out.open("w"),
        stderr=log.open("w"),
        env={**os.environ, **(env or {})},
    )
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        match = re.search(r"odeserve ready grpc=(\S+) metrics=(\S+) http=(\S+)", out.read_text())
        if match:
            http = "" if match.group(3) == "off" else f"http://{match.group(3)}"
            return RunningServer(process, match.group(1), f"http://{match.group(2)}/metrics", log, http)
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stock_client_venv(folder: Path, requirement: str) -> Path:
    """A venv with nothing but ``requirement`` from PyPI (the stock OIP clients pin protobuf
    below 7, so they cannot share the project's venv)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    started = time.monotonic()
    install = subprocess.run(
        [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"{requirement} installed in {time.monotonic() - started:.0f} s")
    return folder
