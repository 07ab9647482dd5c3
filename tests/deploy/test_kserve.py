"""The KServe InferenceService (deploy/kserve): checked as far as can be done without a
cluster. Its predictor is a pod spec plus KServe's scaling fields, so the pod part is validated
against the Kubernetes API schemas; the rest is checked field by field against KServe's
v1beta1 API (no CRD schema is available offline), and against the server's own settings."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from deploy_tools import DEPLOY, ROOT, require_tool
from test_k8s import KUBERNETES_VERSIONS, Manifests

MANIFEST = DEPLOY / "kserve" / "inferenceservice.yaml"
# v1beta1 ComponentExtensionSpec: what a predictor may carry beside its pod spec.
KSERVE_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def container(service) -> dict:
    (container,) = service["spec"]["predictor"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_predictor_is_a_valid_pod_spec(service, version):
    validate = require_tool("kubernetes-validate", "validates the predictor's pod spec against the API schemas")
    predictor = service["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "odeserve-predictor"},
        "spec": {k: v for k, v in predictor.items() if k not in KSERVE_FIELDS},
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "predictor-pod.yaml"
        path.write_text(yaml.safe_dump(pod))
        done = subprocess.run(
            [validate, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0 and " passed for resource " in done.stdout, done.stdout + done.stderr


def test_kserve_fields_are_v1beta1_ones(service):
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    assert {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} <= predictor.keys()
    assert predictor["scaleMetric"] in {"cpu", "memory", "concurrency", "rps"}
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in {"RawDeployment", "Serverless"}


def test_kserve_reaches_the_grpc_port_the_server_listens_on(container, monkeypatch):
    from server.config import ServerConfig, parse_config

    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == ServerConfig().port  # KServe routes gRPC to "h2c"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness == {"path": "/v2/health/ready", "port": ServerConfig().http_port}
    for variable in container["env"]:
        if variable["name"].startswith("ODESERVE_"):
            monkeypatch.setenv(variable["name"], variable["value"])
    config = parse_config([])
    assert config.host == config.metrics_host == config.http_host == "0.0.0.0"


def test_the_predictor_matches_the_plain_deployment(service, container):
    (deployed,) = Manifests("base").one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == deployed["image"]
    assert container["resources"] == deployed["resources"]
    predictor = service["spec"]["predictor"]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = float(next(v["value"] for v in container["env"] if v["name"] == "ODESERVE_GRACE_SECONDS"))
    assert predictor["terminationGracePeriodSeconds"] > sleep + grace
    assert container["securityContext"]["readOnlyRootFilesystem"] and predictor["securityContext"]["runAsNonRoot"]


def test_yaml_passes_yamllint():
    yamllint = require_tool("yamllint", "lints the YAML under deploy/")
    done = subprocess.run(
        [yamllint, "-s", "-c", str(ROOT / ".yamllint.yaml"), str(MANIFEST.parent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
