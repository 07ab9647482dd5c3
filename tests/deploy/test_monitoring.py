"""The monitoring in deploy/: Prometheus config, alert rules and their unit tests (promtool),
YAML style (yamllint), and the Grafana dashboard's queries and the alerts run by a real
Prometheus against a real server under real traffic."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from deploy_tools import DEPLOY, ROOT, require_tool
from live_server import CLASSIFIER, DENSITIES, SHIPPED, start_server
from prometheus_server import Prometheus, dashboard_expressions

from client import Client, OdeServeError

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
TOL = 1e-2


def run(*command: str) -> None:
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), re.MULTILINE))


# ---- static checks ---------------------------------------------------------------------------
def test_prometheus_config_is_valid():
    run(require_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_alert_rules_are_valid():
    run(require_tool("promtool"), "check", "rules", str(ALERTS))


def test_alert_rules_pass_their_unit_tests():
    run(require_tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml"))


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet():
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    for name in alert_names():
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*)", tests)
        assert "" in cases, f"{name} has no case that fires"
        assert " []" in cases, f"{name} has no case that must stay quiet"


def test_yaml_under_deploy_passes_yamllint():
    run(require_tool("yamllint"), "-s", "-c", str(ROOT / ".yamllint.yaml"), str(DEPLOY))


def test_dashboard_queries_use_the_variables():
    dashboard = json.loads((DEPLOY / "grafana" / "odeserve.json").read_text())
    raw = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all('model=~"$model"' in expr for expr in raw), "every query filters on the model variable"
    assert all("[$__rate_interval]" in expr for expr in raw if "rate(" in expr)
    for title, expr in dashboard_expressions():
        assert "$" not in expr, f"{title}: a Grafana variable is left in {expr}"


# ---- live: a server, traffic, and Prometheus scraping it ------------------------------------
def send_traffic(target: str, images: np.ndarray) -> None:
    """Every RPC kind on every model family, and client mistakes for the error panels."""
    with Client(target, timeout_s=120) as client:
        for batch in np.array_split(images, 8):  # the invalid request below stays a minority
            client.classify(batch, model=CLASSIFIER, tol=TOL)
        points = client.sample(n=32, model=DENSITIES[0], tol=TOL, seed=1).points
        client.log_density(points, model=DENSITIES[0], tol=TOL)
        with pytest.raises(OdeServeError) as unknown:
            client.sample(n=4, model="no-such-model", tol=TOL)
        assert unknown.value.code == "NOT_FOUND"
        with pytest.raises(OdeServeError) as invalid:
            client.classify(images[:1], model=CLASSIFIER, tol=-1.0)
        assert invalid.value.code == "INVALID_ARGUMENT"


def rules(prometheus: Prometheus) -> list[dict]:
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10) as response:
        return [rule for group in json.load(response)["data"]["groups"] for rule in group["rules"]]


def evaluated_at(rule: dict) -> float:
    """The rule's last evaluation as a Unix time (Prometheus gives RFC 3339 with nanoseconds)."""
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", rule["lastEvaluation"])
    return datetime.fromisoformat(stamp).timestamp()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, mnist_dir: Path):
    """A server on the shipped checkpoints after two rounds of traffic, and a Prometheus that
    scraped it throughout and evaluated the alerts after the traffic."""
    require_tool("prometheus")
    torchvision = pytest.importorskip("torchvision")
    images = torchvision.datasets.MNIST(str(mnist_dir), train=False, download=False).data[:64].numpy()
    tmp = tmp_path_factory.mktemp("monitoring")
    server = start_server(SHIPPED, tmp)
    try:
        metrics_address = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with Prometheus([metrics_address], tmp / "prometheus", rule_files=[ALERTS]) as prometheus:
            prometheus.wait_for('up{job="odeserve"} == 1')
            # A labelled counter is born at its first increment, which rate() cannot see:
            # the second round is the one that the dashboard's rates show.
            send_traffic(server.target, images)
            prometheus.wait_for('odeserve_requests_total{code="NOT_FOUND"}')
            send_traffic(server.target, images)
            prometheus.wait_for('rate(odeserve_requests_total{code="NOT_FOUND"}[1m]) > 0')
            prometheus.wait_for("rate(odeserve_item_expected_nfe_total[1m]) > 0")
            traffic_seen = time.time()
            deadline = time.monotonic() + 30
            while min(evaluated_at(rule) for rule in rules(prometheus)) <= traffic_seen:
                assert time.monotonic() < deadline, "the alert rules were not evaluated after the traffic"
                time.sleep(0.2)
            yield prometheus
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


def test_every_dashboard_query_returns_data(monitored):
    """No panel may say "No data" on a server in use: the error ratio, for one, shows 0 when
    nothing failed."""
    empty = [f"{title}: {expr}" for title, expr in dashboard_expressions() if not monitored.query(expr)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_metric_the_alerts_use_is_exported(monitored):
    names = set(re.findall(r"\b(odeserve_\w+)", ALERTS.read_text()))
    missing = [name for name in sorted(names) if not monitored.query(f'count({{__name__="{name}"}})')]
    assert not missing, f"alerts.yml uses metrics the server does not export: {missing}"


def test_prometheus_loads_and_evaluates_every_alert(monitored):
    loaded = {rule["name"]: rule for rule in rules(monitored) if rule["type"] == "alerting"}
    assert set(loaded) == alert_names()
    broken = {name: rule["lastError"] for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not broken, f"alert rules failing on live data: {broken}"


def test_a_healthy_server_raises_only_the_client_error_alert(monitored):
    active = {
        (alert["labels"]["alertname"], alert["labels"].get("model"), alert["state"])
        for rule in rules(monitored)
        for alert in rule.get("alerts", ())
    }
    # Requests for a model the server lacks are all client mistakes, filed under "unknown";
    # every other alert's condition is false, and none has held long enough to fire.
    assert active == {("OdeserveHighClientErrorRatio", "unknown", "pending")}
