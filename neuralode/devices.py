"""Choosing a device from a user's setting."""

from __future__ import annotations

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
