"""Choosing a device from a user's setting."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one; ``cpu``, ``cuda``, ``cuda:N`` as given, with a
    clear error when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def cpu_description() -> str:
    """This machine's CPU as benchmark records name it: its model, architecture and cores, so
    that figures from different machines are never compared unknowingly."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {platform.machine()}, {os.cpu_count()} cores"
