"""The Kubernetes manifests (deploy/k8s): the base and both overlays render with kustomize, the
rendered objects are valid Kubernetes API objects, and they keep the promises the server and
its clients depend on: probes on the health service, a termination grace period that covers the
drain, a locked-down pod, selectors that find the pods, the right image and device per overlay,
and a custom metric the server exports and prometheus-adapter publishes."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from deploy_tools import DEPLOY, ROOT, require_tool

K8S = DEPLOY / "k8s"
VARIANTS = ("base", "overlays/cpu", "overlays/cpu-per-core", "overlays/gpu")
# The oldest release with native gRPC probes (GA in 1.27), and a current one.
KUBERNETES_VERSIONS = ("1.27.0", "1.35.0")
# Custom resources: kubernetes-validate has no schema for them, so their fields are checked here.
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
# Every kind the kustomizations render.
KINDS = {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
GPU = "nvidia.com/gpu"

_rendered: dict[str, str] = {}


def render(variant: str) -> str:
    """``kubectl kustomize`` of one variant, as text (once per session)."""
    if variant not in _rendered:
        kubectl = require_tool("kubectl", "renders deploy/k8s with its built-in kustomize")
        command = [kubectl, "kustomize", str(K8S / variant)]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"kubectl kustomize {variant} failed:\n{done.stderr}"
        _rendered[variant] = done.stdout
    return _rendered[variant]


class Manifests:
    """The rendered objects of one variant, with the lookups the tests share."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.objects = [doc for doc in yaml.safe_load_all(render(variant)) if doc]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"{self.variant}: expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict:
        return self.one("Deployment")

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]

    @property
    def container(self) -> dict:
        containers = self.pod["spec"]["containers"]
        assert [c["name"] for c in containers] == ["odeserve"]
        return containers[0]

    @property
    def config(self) -> dict[str, str]:
        """The data of the ConfigMap the container takes its environment from."""
        refs = [source["configMapRef"]["name"] for source in self.container.get("envFrom", [])]
        maps = {m["metadata"]["name"]: m for m in self.all("ConfigMap")}
        assert len(refs) == 1 and refs[0] in maps, f"envFrom {refs}, ConfigMaps {sorted(maps)}"
        return maps[refs[0]]["data"]

    def container_port(self, name: str) -> int:
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        assert name in ports, f"the pod has no port named {name!r} (has {sorted(ports)})"
        return ports[name]


@pytest.fixture(scope="module", params=VARIANTS)
def manifests(request) -> Manifests:
    return Manifests(request.param)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_valid_kubernetes_objects(variant, version):
    validate = require_tool("kubernetes-validate", "validates the rendered manifests against the API schemas")
    objects = [doc for doc in yaml.safe_load_all(render(variant)) if doc]
    assert {o["kind"] for o in objects} == KINDS
    core = [o for o in objects if o["kind"] not in CRD_KINDS]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{variant.replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(core))
        command = [validate, "--strict", "-k", version, str(path)]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # an unknown kind or apiVersion only warns: make it fail
    assert "Couldn't find schema" not in output, output
    assert output.count(" passed for resource ") == len(core), output


def test_probes_call_the_health_services_on_the_served_ports(manifests):
    container = manifests.container
    port = manifests.container_port("grpc")
    assert port == int(manifests.config["ODESERVE_PORT"]) == 50051
    readiness = container["readinessProbe"]
    assert {"grpc", "httpGet", "tcpSocket", "exec"} & readiness.keys() == {"httpGet"}
    assert readiness["httpGet"]["path"] == "/v2/health/ready" and readiness["httpGet"]["port"] == "http"
    assert manifests.container_port("http") == int(manifests.config["ODESERVE_HTTP_PORT"]) == 8080
    for kind in ("startupProbe", "livenessProbe"):
        probe = container[kind]
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & probe.keys()
        assert handlers == {"grpc"}, f"{kind} uses {handlers}"
        assert probe["grpc"]["port"] == port, f"{kind} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") == "", "the server's readiness is the overall service ''"
    # models take seconds to load: the startup probe, not liveness, must cover that
    startup = container["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 60


def drain_seconds(manifests: Manifests) -> float:
    return float(manifests.config["ODESERVE_GRACE_SECONDS"])


def pre_stop_seconds(manifests: Manifests) -> float:
    command = manifests.container["lifecycle"]["preStop"]["exec"]["command"]
    assert len(command) == 2 and command[0] == "sleep", f"preStop should be a plain sleep, is {command}"
    return float(command[1])


def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain(manifests):
    grace = manifests.pod["spec"]["terminationGracePeriodSeconds"]
    pre_stop, drain = pre_stop_seconds(manifests), drain_seconds(manifests)
    assert pre_stop >= 2, "endpoint removal needs a few seconds to reach kube-proxy and clients"
    assert grace > pre_stop + drain, f"SIGKILL at {grace} s cuts {pre_stop} s preStop + {drain} s drain"


def test_liveness_does_not_restart_a_draining_pod(manifests):
    # While draining the health service answers NOT_SERVING on purpose.
    liveness = manifests.container["livenessProbe"]
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert patience > drain_seconds(manifests)


def test_pod_runs_locked_down(manifests):
    pod, container = manifests.pod["spec"], manifests.container
    effective = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 10001
    assert effective["seccompProfile"]["type"] == "RuntimeDefault"
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # a read-only root needs a writable /tmp
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_no_service_link_variables_collide_with_the_settings(manifests):
    # A Service named odeserve makes the kubelet inject ODESERVE_PORT=tcp://<ip>:50051.
    assert manifests.pod["spec"]["enableServiceLinks"] is False


def test_the_server_accepts_the_configmap(manifests, monkeypatch):
    from server.config import ServerConfig, parse_config

    settings = {f"ODESERVE_{f.name.upper()}" for f in dataclasses.fields(ServerConfig)}
    assert not manifests.config.keys() - settings, "the server ignores these (misspelt?) settings"
    for key in [k for k in os.environ if k.startswith("ODESERVE_")]:
        monkeypatch.delenv(key)
    for key, value in manifests.config.items():
        monkeypatch.setenv(key, value)
    config = parse_config([])  # unknown or malformed settings exit here
    # the probes, the Services and Prometheus all connect to the pod IP, not the loopback
    assert {config.host, config.metrics_host, config.http_host} <= {"0.0.0.0", "::"}
    assert config.port == manifests.container_port("grpc")
    assert config.http_port == manifests.container_port("http")
    assert config.metrics_port == manifests.container_port("metrics")
    assert config.checkpoints == Path("/opt/odeserve/checkpoints")


def test_services_reach_the_pods_on_named_ports(manifests):
    labels = manifests.pod["metadata"]["labels"]
    assert selects(manifests.deployment["spec"]["selector"]["matchLabels"], labels)
    services = {s["metadata"]["name"]: s for s in manifests.all("Service")}
    assert set(services) == {"odeserve", "odeserve-headless"}
    for name, service in services.items():
        assert selects(service["spec"]["selector"], labels), f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            manifests.container_port(port["targetPort"])  # exists on the pod
            assert port["targetPort"] == port["name"]
            if port["name"] == "grpc":
                assert port["appProtocol"] == "grpc"
    assert {p["name"] for p in services["odeserve"]["spec"]["ports"]} == {"grpc", "http", "metrics"}
    headless = services["odeserve-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["name"] for p in headless["ports"]] == ["grpc"]  # metrics on one Service only: scraped once
    assert not headless.get("publishNotReadyAddresses", False)  # draining pods leave DNS


def test_pdb_and_hpa_govern_the_deployment(manifests):
    deployment = manifests.deployment
    labels = manifests.pod["metadata"]["labels"]
    pdb = manifests.one("PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb["minAvailable"] == 1
    hpa = manifests.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    name = deployment["metadata"]["name"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", name)
    # the floor leaves room for one voluntary eviction
    assert hpa["spec"]["minReplicas"] > pdb["minAvailable"]
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["metric"]["name"] for m in pods_metrics] == ["odeserve_queued_items"]
    assert pods_metrics[0]["target"]["type"] == "AverageValue"
    # a backlog target above the running batch would never trigger before requests queue for long
    assert 0 < float(pods_metrics[0]["target"]["averageValue"]) <= int(manifests.config["ODESERVE_MAX_BATCH"])
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert len(cpu) == (0 if manifests.variant == "overlays/gpu" else 1)
    # a Utilization target needs a CPU request to be a percentage of
    assert "cpu" in manifests.container["resources"]["requests"]


def test_service_monitor_scrapes_each_pod_once(manifests):
    monitor = manifests.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert set(monitor["spec"]["selector"]) == {"matchLabels"}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    selected = [s for s in manifests.all("Service") if selects(selector, s["metadata"].get("labels", {}))]
    with_port = [s for s in selected if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in with_port] == ["odeserve"]
    assert selects(with_port[0]["spec"]["selector"], manifests.pod["metadata"]["labels"])


def resource_keys(container: dict) -> set[str]:
    resources = container.get("resources", {})
    return set(resources.get("requests", {})) | set(resources.get("limits", {}))


def test_gpu_overlay_runs_on_one_gpu_with_the_cuda_image():
    gpu, base = Manifests("overlays/gpu"), Manifests("base")
    container = gpu.container
    assert container["image"] == "odeserve:0.1.0-cuda"
    assert gpu.config["ODESERVE_DEVICE"] == "cuda"
    assert str(container["resources"]["limits"][GPU]) == "1"
    assert str(container["resources"].get("requests", {}).get(GPU, "1")) == "1"
    tolerations = gpu.pod["spec"]["tolerations"]
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in tolerations)
    requested = cpu_millis(container["resources"]["requests"]["cpu"])
    assert requested < cpu_millis(base.container["resources"]["requests"]["cpu"]), "the GPU does the solving"


def test_cpu_overlay_runs_the_cpu_image_without_a_gpu():
    cpu = Manifests("overlays/cpu")
    assert cpu.container["image"] == "odeserve:0.1.0"
    assert cpu.config["ODESERVE_DEVICE"] == "cpu"
    assert GPU not in resource_keys(cpu.container)
    assert not any(t.get("key") == GPU for t in cpu.pod["spec"].get("tolerations", []))
    assert GPU not in render("overlays/cpu")


def test_cpu_per_core_overlay_runs_one_intra_op_thread_per_pod_on_the_same_cores():
    per_core, cpu = Manifests("overlays/cpu-per-core"), Manifests("overlays/cpu")
    container = per_core.container
    assert container["image"] == cpu.container["image"] and per_core.config == cpu.config
    assert cpu_millis(container["resources"]["limits"]["cpu"]) == 1000
    threads = next(e for e in container["env"] if e["name"] == "OMP_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu" and str(threads["divisor"]) == "1"  # so torch runs one thread
    # As many cores at the most as the cpu overlay's pods: twice the pods of half the limit.
    most = {m.variant: m.one("HorizontalPodAutoscaler")["spec"]["maxReplicas"] for m in (per_core, cpu)}
    limits = {m.variant: cpu_millis(m.container["resources"]["limits"]["cpu"]) for m in (per_core, cpu)}
    assert most[per_core.variant] * limits[per_core.variant] == most[cpu.variant] * limits[cpu.variant]


def cpu_millis(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def test_prometheus_adapter_publishes_the_hpa_metric_the_server_exports():
    from server.metrics import Metrics

    exported = {family.name for family in Metrics().registry.collect()}
    values = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rules = values["rules"]["custom"]
    hpa = Manifests("base").one("HorizontalPodAutoscaler")
    for metric in [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]:
        matching = [r for r in rules if r["name"]["as"] == metric]
        assert all(re.fullmatch(r["name"]["matches"], metric) for r in matching)
        assert len(matching) == 1, f"no adapter rule publishes {metric}"
        rule = matching[0]
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in exported, f"the server exports no {series}"
        # per pod: the series' pod and namespace labels name the Kubernetes objects
        overrides = {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert rule["resources"]["overrides"] == overrides
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_yaml_passes_yamllint():
    yamllint = require_tool("yamllint", "lints the YAML under deploy/")
    command = [yamllint, "-s", "-c", str(ROOT / ".yamllint.yaml"), str(K8S)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
