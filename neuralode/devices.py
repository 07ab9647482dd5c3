"""Choosing a device from a user's setting, and how large a block of rows suits the CPU."""

from __future__ import annotations

import torch

CPU_BLOCK_BYTES = 4 << 20
"""On the CPU, the most memory one block of rows may span when a row-wise computation runs in
blocks. Larger tensors miss the cache and, from glibc, come as fresh pages to fault in: the
ODE-Net's downsampling of 256 images and its dynamics on 1,000 states run the same arithmetic
1.5-3 times faster in blocks of this size (docs/server.md, "The model outside the ODE";
docs/solvers.md, "Measured")."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one; ``cpu``, ``cuda``, ``cuda:N`` as given, with a
    clear error when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def cpu_block_rows(device: torch.device, bytes_per_row: int) -> int | None:
    """Rows per block so that a block spans at most :data:`CPU_BLOCK_BYTES` on the CPU (at
    least one row); ``None`` elsewhere, where one large call is what a GPU wants."""
    if device.type != "cpu":
        return None
    return max(1, CPU_BLOCK_BYTES // max(1, bytes_per_row))
