"""``python -m client`` against a real server."""

import json
import subprocess
import sys

import pytest
from live_server import CLASSIFIER, DENSITIES, ROOT


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", "--target", server.target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_classify_png_files(server, mnist_test_digits, tmp_path):
    from PIL import Image

    images, labels = mnist_test_digits
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(str(path))
    table = cli(server, "classify", "--model", CLASSIFIER, "--tol", "1e-2", *paths)
    assert table.returncode == 0, table.stderr
    assert "label" in table.stdout and "SUCCESS" in table.stdout
    report = json.loads(cli(server, "classify", "--model", CLASSIFIER, "--tol", "1e-2", "--json", *paths).stdout)
    assert [row["label"] for row in report["predictions"]] == labels[:3].tolist()


def test_colour_and_other_sizes_are_converted_to_28x28_grayscale(server, mnist_test_digits, tmp_path):
    from PIL import Image

    images, labels = mnist_test_digits
    digits = [Image.fromarray(images[i]) for i in range(3)]
    files = {
        "rgb.png": digits[0].convert("RGB").resize((56, 56)),
        "rgba.png": digits[1].convert("RGBA"),
        "small.jpg": digits[2].resize((20, 20)),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    result = cli(server, "classify", "--model", CLASSIFIER, "--json", *(str(tmp_path / name) for name in files))
    assert result.returncode == 0, result.stderr
    assert [row["label"] for row in json.loads(result.stdout)["predictions"]] == labels[:3].tolist()


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.png", None, "No such file or directory"),
        ("notes.png", b"not an image\n", "not an image file Pillow can read"),
    ],
)
def test_an_unreadable_image_is_one_line_and_exit_status_2(server, tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = cli(server, "classify", "--model", CLASSIFIER, str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: {reason}") and len(result.stderr.splitlines()) == 1


def test_sample_log_density_and_models(server):
    sampled = json.loads(cli(server, "sample", "--model", DENSITIES[0], "--n", "3", "--seed", "5", "--json").stdout)
    assert len(sampled["points"]) == 3 and sampled["status"] == ["SUCCESS"] * 3
    points = [",".join(str(v) for v in p) for p in sampled["points"]]
    # "--" ends the options, so points that start with a minus sign are not read as flags.
    density = json.loads(
        cli(server, "log-density", "--model", DENSITIES[0], "--tol", "1e-5", "--json", "--", *points).stdout
    )
    assert all(abs(a - b) < 0.05 for a, b in zip(density["log_density"], sampled["log_density"]))
    listing = cli(server, "models")
    assert CLASSIFIER in listing.stdout and DENSITIES[0] in listing.stdout


def test_every_request_option_is_a_flag(server):
    def nfe_and_status(*flags: str) -> tuple[list[int], list[str]]:
        result = cli(server, "sample", "--model", DENSITIES[0], "--n", "4", "--seed", "2", "--json", *flags)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        return report["nfe"], report["status"]

    tight = nfe_and_status("--tol", "1e-5")
    assert nfe_and_status("--rtol", "1e-5", "--atol", "1e-5") == tight
    assert nfe_and_status("--tol", "1e-5", "--method", "bosh3")[0] != tight[0]
    assert nfe_and_status("--tol", "1e-5", "--max-nfe", "8")[1] == ["MAX_NFE"] * 4


def test_the_tolerance_used_is_shown_and_in_the_json(server):
    table = cli(server, "sample", "--model", DENSITIES[0], "--n", "2", "--tol", "1e-2")
    assert table.returncode == 0 and "solved at tol 0.01 (dopri5, float32)" in table.stdout, table.stdout
    default = cli(server, "sample", "--model", DENSITIES[0], "--n", "2", "--tol", "0")  # 0: the model's default
    assert "solved at tol 0.001 (dopri5, float32)" in default.stdout, default.stdout
    report = json.loads(
        cli(server, "sample", "--model", DENSITIES[0], "--n", "2", "--rtol", "1e-3", "--atol", "1e-5", "--json").stdout
    )
    assert report["solved"] == {
        "rtol": 1e-3,
        "atol": 1e-5,
        "method": "dopri5",
        "precision": "float32",
        "preemptions": 0,
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--tol", "abc"), "argument --tol: a number such as 1e-3, or auto; got 'abc'"),
        (("--max-nfe", "1.5"), "argument --max-nfe: an integer; got '1.5'"),
        (("--rtol", "x"), "argument --rtol: a number; got 'x'"),
    ],
)
def test_a_malformed_option_says_what_it_expects(server, flags, message):
    result = cli(server, "sample", "--model", DENSITIES[0], *flags)
    assert result.returncode == 2 and result.stderr.splitlines()[-1].endswith(message), result.stderr


def test_a_misspelt_model_gets_a_suggestion(server):
    result = cli(server, "sample", "--model", "cnf-8gausians")
    assert result.returncode == 1 and "did you mean 'cnf-8gaussians'?" in result.stderr, result.stderr


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

    result = subprocess.run(
        [sys.executable, "-m", "client", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", "health"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
