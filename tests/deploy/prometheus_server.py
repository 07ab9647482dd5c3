"""A real Prometheus for the deploy tests, and the Grafana dashboard's queries in a form it
runs. A plain module (not a conftest) so that any test folder can import it."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from deploy_tools import DEPLOY, free_port, require_tool

# What the dashboard's Grafana variables become in a plain query. The rate window is wider than
# Grafana would pick for a 1 s scrape so that it still holds all of a short test's traffic.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "datasource": "prometheus",
    "model": ".*",  # "All": the dashboard matches models with =~
}


class Prometheus:
    """``prometheus`` scraping ``targets`` (host:port, path /metrics) as job ``odeserve`` and
    evaluating ``rule_files`` every ``scrape_interval``; listens on 127.0.0.1 only and keeps
    its data and log in ``workdir``. Starts on ``with``, stops when the block ends."""

    def __init__(
        self, targets: list[str], workdir: Path, rule_files: Sequence[Path] = (), scrape_interval: str = "1s"
    ) -> None:
        self.binary = require_tool("prometheus")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.address}"
        self.log = self.workdir / "prometheus.log"
        self.config = self.workdir / "prometheus.yml"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(Path(path).resolve()) for path in rule_files],
            "scrape_configs": [{"job_name": "odeserve", "static_configs": [{"targets": list(targets)}]}],
        }
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        command = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.address}",
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if Prometheus has not exited within ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def query(self, expr: str) -> list[dict]:
        """The instant query's result now; an AssertionError carries Prometheus' message when
        the query fails (a syntax error, a many-to-many match, ...)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:  # 4xx/5xx carry the reason as JSON
            answer = json.loads(error.read() or b"{}")
        if answer.get("status") != "success":
            raise AssertionError(f"{expr}\n  -> {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        """Poll ``expr`` until its result is non-empty; on timeout the error shows the scrape
        targets' health, the usual reason."""
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"no result for {expr} after {timeout} s; targets: {self._targets()}")
            self._check_alive()
            time.sleep(0.2)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet, or 503 while it replays its write-ahead log
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")

    def _targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active = json.load(response)["data"]["activeTargets"]
        return [{key: target.get(key) for key in ("scrapeUrl", "health", "lastError")} for target in active]


def dashboard_expressions(path: Path = DEPLOY / "grafana" / "odeserve.json") -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel, rows' panels included, with the
    Grafana variables of GRAFANA_VARIABLES filled in; others stay, for the caller to catch."""

    def fill(match: re.Match) -> str:
        return GRAFANA_VARIABLES.get(match.group(1) or match.group(2), match.group(0))

    def panels(container: dict):
        for panel in container.get("panels", ()):
            yield panel
            yield from panels(panel)

    dashboard = json.loads(Path(path).read_text())
    return [
        (panel["title"], re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, target["expr"]))
        for panel in panels(dashboard)
        for target in panel.get("targets", ())
        if target.get("expr")
    ]
