"""Fixtures for every test folder: devices, the real MNIST, the shipped checkpoints and servers on them."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

# Test helpers (tests/<package>/problems.py, ...) import as plain modules.
for package in Path(__file__).parent.iterdir():
    if package.is_dir():
        sys.path.insert(0, str(package))

from live_server import CLASSIFIER, DENSITIES, SHIPPED, RunningServer, start_server  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device this machine has: CPU always, CUDA where present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST in torchvision's layout: ../shared/data, or $ODESERVE_DATA_DIR."""
    import os

    root = Path(os.environ.get("ODESERVE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        raise FileNotFoundError(f"MNIST is expected under {root}/MNIST/raw (set ODESERVE_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def mnist_test_digits(mnist_dir):
    """The real MNIST test set as a client sends it: uint8 images [10000, 28, 28], int labels."""
    from training.data import load_mnist

    test = load_mnist(mnist_dir, train=False, download=False)
    return test.images[:, 0].numpy(), test.labels.numpy()


@pytest.fixture(scope="session")
def shipped() -> Path:
    missing = [name for name in (CLASSIFIER, *DENSITIES) if not (SHIPPED / f"{name}.pt").exists()]
    if missing:
        raise FileNotFoundError(f"shipped checkpoints missing from {SHIPPED}: {missing} (train them: see README)")
    return SHIPPED


@pytest.fixture(scope="session")
def density_only(shipped, tmp_path_factory) -> Path:
    """A checkpoints folder with one small CNF: servers that start fast, for tests of the
    transport rather than the models."""
    folder = tmp_path_factory.mktemp("density-only")
    shutil.copy(shipped / f"{DENSITIES[0]}.pt", folder / f"{DENSITIES[0]}.pt")
    return folder


@pytest.fixture(scope="session")
def server(shipped, tmp_path_factory) -> RunningServer:
    """The default server on the shipped checkpoints, shared by the tests that only read."""
    running = start_server(shipped, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0
