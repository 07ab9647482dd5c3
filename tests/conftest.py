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
