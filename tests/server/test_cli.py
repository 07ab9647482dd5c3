"""``python -m client`` against a real server."""

import json
import subprocess
import sys

from live_server import CLASSIFIER, DENSITIES, ROOT


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", "--target", server.target, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_classify_png_files(server, mnist_dir, tmp_path):
    from PIL import Image

    from training.data import load_mnist

    test = load_mnist(mnist_dir, train=False, download=False)
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        paths.append(str(path))
    table = cli(server, "classify", "--model", CLASSIFIER, "--tol", "1e-2", *paths)
    assert table.returncode == 0, table.stderr
    assert "label" in table.stdout and "SUCCESS" in table.stdout
    report = json.loads(cli(server, "classify", "--model", CLASSIFIER, "--tol", "1e-2", "--json", *paths).stdout)
    assert [row["label"] for row in report["predictions"]] == test.labels[:3].tolist()


def test_sample_log_density_and_models(server):
    sampled = json.loads(cli(server, "sample", "--model", DENSITIES[0], "--n", "3", "--seed", "5", "--json").stdout)
    assert len(sampled["points"]) == 3 and sampled["status"] == ["SUCCESS"] * 3
    points = [",".join(str(v) for v in p) for p in sampled["points"]]
    # "--" ends the options, so points that start with a minus sign are not read as flags.
    density = json.loads(cli(server, "log-density", "--model", DENSITIES[0], "--tol", "1e-5", "--json", "--", *points).stdout)
    assert all(abs(a - b) < 0.05 for a, b in zip(density["log_density"], sampled["log_density"]))
    listing = cli(server, "models")
    assert CLASSIFIER in listing.stdout and DENSITIES[0] in listing.stdout


def test_errors_exit_nonzero_with_the_reason(server):
    result = cli(server, "sample", "--model", "nope")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_health_is_a_container_health_check(server):
    serving = cli(server, "health")
    assert serving.returncode == 0 and serving.stdout.strip() == "SERVING"
    per_model = cli(server, "health", "--service", CLASSIFIER, "--json")
    assert per_model.returncode == 0 and json.loads(per_model.stdout) == {"service": CLASSIFIER, "status": "SERVING"}
    unknown = cli(server, "health", "--service", "nope")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_health_fails_when_nothing_listens(tmp_path):
    from deploy_tools import free_port

    result = subprocess.run([sys.executable, "-m", "client", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", "health"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
