"""What every training command shares: devices, seeds, logging, progress, distribution."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neuralode.devices import cpu_description, resolve_device
from neuralode.models import Regularisation

__all__ = [
    "Distributed",
    "command_line",
    "default_data_dir",
    "device_name",
    "first_step_hyper",
    "peak_memory",
    "regularisation_from",
    "resolve_device",
    "seed_everything",
    "setup_logging",
]

log = logging.getLogger("training")


def device_name(device: torch.device) -> str:
    """The device as cards and logs name it: a GPU's name, or the CPU's model, cores and torch's
    threads, so that a card's times say which machine they came from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in MiB: its resident set (all of Python, torch and
    the data) and, on a GPU, the most torch had allocated there."""
    import resource

    peak = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.type == "cuda":
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def first_step_hyper(args: argparse.Namespace) -> dict:
    """``--first-step`` as a model setting: only when given, so a card without it means Hairer's rule."""
    return {} if args.first_step is None else {"first_step": args.first_step}


def regularisation_from(args: argparse.Namespace) -> Regularisation:
    """``--kinetic``/``--jacobian``/``--density-curvature``/``--local-error`` (absent where a
    model has no ODE, or the term is a CNF's: no such term)."""
    try:
        return Regularisation(
            kinetic=getattr(args, "kinetic", 0.0),
            jacobian=getattr(args, "jacobian", 0.0),
            density_curvature=getattr(args, "density_curvature", 0.0),
            local_error=getattr(args, "local_error", 0.0),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "odeserve" / "data"


def command_line() -> str:
    return "python -m training " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_environment(device: torch.device) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return Distributed()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)

    def device_for(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.enabled else device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def from_main(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank, so that all ranks take the same decision."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


def setup_logging(log_file: Path | None, is_main: bool, append: bool = False) -> None:
    """Log to stderr and, on the main process, to ``log_file`` (``append``: a resumed run
    continues the log of the sittings before it)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if append else "w"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
