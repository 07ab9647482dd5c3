"""The client as its own distribution: ``pip install ./client`` into a fresh venv (PyPI for grpcio,
protobuf and numpy) gives an SDK and a command line without torch, which classify real MNIST
through a live server. The README's SDK snippet runs there as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from live_server import CLASSIFIER, ROOT


class Venv:
    def __init__(self, folder: Path) -> None:
        self.folder, self.python = folder, folder / "bin" / "python"

    def run(self, *args: str, cwd: Path, timeout: float = 120, isolated: bool = True) -> subprocess.CompletedProcess:
        """``python -I`` (no PYTHONPATH, no current folder on sys.path): only what is installed;
        ``isolated=False`` keeps the current folder first on sys.path, as a user's shell does."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        flags = ["-I"] if isolated else ["-s"]
        return subprocess.run(
            [str(self.python), *flags, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    def installed(self) -> dict[str, str]:
        listing = self.run("-m", "pip", "list", "--format", "json", cwd=self.folder)
        assert listing.returncode == 0, listing.stderr
        return {p["name"].lower(): p["version"] for p in json.loads(listing.stdout)}


@pytest.fixture(scope="session")
def client_only(tmp_path_factory) -> Venv:
    """One fresh venv for the session, with nothing but ``pip install ./client``."""
    venv = Venv(tmp_path_factory.mktemp("client-only") / "venv")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv.folder)], check=True, timeout=120)
    install = venv.run("-m", "pip", "install", "--quiet", str(ROOT / "client"), cwd=venv.folder.parent, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"client-only venv installed in {time.monotonic() - started:.0f} s")
    return venv


def test_installs_without_torch_or_the_server(client_only):
    installed = client_only.installed()
    assert {"odeserve-client", "grpcio", "protobuf", "numpy", "grpcio-health-checking"} <= installed.keys()
    assert not {"torch", "odeserve", "pillow", "prometheus-client"} & installed.keys()
    for module in ("torch", "server", "neuralode"):
        absent = client_only.run("-c", f"import {module}", cwd=client_only.folder)
        assert absent.returncode == 1 and f"No module named '{module}'" in absent.stderr
    imported = client_only.run(
        "-c", "import client, client.aio, odeserve.v1.odeserve_pb2, sys; print(client.__file__)", cwd=client_only.folder
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(client_only.folder)), "client must come from the venv, not the checkout"


WHICH_CLIENT = "import client; print(client.__file__, hasattr(client, 'Client'))"


def test_the_checkouts_client_folder_does_not_shadow_the_installed_package(client_only):
    """``client/`` at the repository's root is the distribution, not a package (no ``__init__.py``):
    run from the root, ``import client`` must still find the installed SDK, not an empty namespace."""
    assert (ROOT / "client" / "client" / "__init__.py").is_file() and not (ROOT / "client" / "__init__.py").exists()
    from_root = client_only.run("-c", WHICH_CLIENT, cwd=ROOT, isolated=False)
    assert from_root.returncode == 0, from_root.stderr
    path, has_client = from_root.stdout.split()
    assert path.startswith(str(client_only.folder)) and has_client == "True"
    # the test suite's own venv, an editable install: the package inside the folder
    editable = subprocess.run(
        [sys.executable, "-c", WHICH_CLIENT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert editable.returncode == 0, editable.stderr
    path, has_client = editable.stdout.split()
    assert path.endswith("client/__init__.py") and has_client == "True"


def readme_sdk_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (snippet,) = [b for b in blocks if "from client import Client" in b]
    return snippet


def test_the_readme_snippet_classifies_real_mnist(client_only, server, mnist_dir, mnist_test_digits, tmp_path):
    assert "../shared/data" in readme_sdk_snippet() and "127.0.0.1:50051" in readme_sdk_snippet()
    script = readme_sdk_snippet().replace("../shared/data", str(mnist_dir)).replace("127.0.0.1:50051", server.target)
    script += (
        "\nimport json\n"
        "print(json.dumps({'dtype': str(images.dtype), 'shape': images.shape, 'labels': loose.labels.tolist(),\n"
        "                  'nfe': [loose.items.nfe.mean(), tight.items.nfe.mean()], 'ok': loose.items.all_succeeded}))\n"
    )
    (tmp_path / "snippet.py").write_text(script)
    result = client_only.run(str(tmp_path / "snippet.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    n = report["shape"][0]
    assert report["dtype"] == "uint8" and report["shape"] == [n, 28, 28] and n >= 10 and report["ok"]
    assert (np.asarray(report["labels"]) == mnist_test_digits[1][:n]).mean() > 0.95
    assert report["nfe"][0] < report["nfe"][1]


def test_the_command_line_works_and_says_what_reading_images_needs(client_only, server, tmp_path):
    cli = ("-m", "client", "--target", server.target)
    health = client_only.run(*cli, "health", cwd=tmp_path)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    models = client_only.run(*cli, "models", "--json", cwd=tmp_path)
    assert CLASSIFIER in {m["name"] for m in json.loads(models.stdout)["models"]}
    (tmp_path / "digit.png").write_bytes(b"")
    classify = client_only.run(*cli, "classify", "--model", CLASSIFIER, str(tmp_path / "digit.png"), cwd=tmp_path)
    assert classify.returncode == 2 and classify.stdout == ""
    assert (
        classify.stderr == "error: reading image files needs Pillow: pip install 'odeserve-client[cli]' (or pillow)\n"
    )
