import sys
from pathlib import Path

import pytest
import torch

# Test helpers (tests/<package>/problems.py, ...) import as plain modules.
for package in Path(__file__).parent.iterdir():
    if package.is_dir():
        sys.path.insert(0, str(package))

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
