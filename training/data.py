"""MNIST as tensors, with the paper's random-crop augmentation done batch-wise on tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSet:
    images: Tensor  # [N, 1, 28, 28] uint8
    labels: Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int | None) -> ImageSet:
        return self if n is None else ImageSet(self.images[:n], self.labels[:n])


def load_mnist(data_dir: str | Path, train: bool, download: bool = True) -> ImageSet:
    """MNIST through torchvision (torchvision's folder layout under ``data_dir``)."""
    import torchvision

    try:
        dataset = torchvision.datasets.MNIST(root=str(data_dir), train=train, download=download)
    except RuntimeError as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(
            f"MNIST not found under {data_dir} (torchvision's layout: {Path(data_dir) / 'MNIST' / 'raw'}) and not "
            f"downloadable ({cause}; torchvision fetches the whole set, training images first): pass --data-dir "
            "a folder that holds it"
        ) from None
    return ImageSet(dataset.data.unsqueeze(1).contiguous(), dataset.targets.clone())


def to_float(images: Tensor) -> Tensor:
    """uint8 0–255 → float32 in [0, 1], the models' (and the server's) input convention."""
    return images.float().div_(255.0)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and cut a random 28×28 window per image."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def epoch_order(data: ImageSet, *, shuffle: bool, generator: torch.Generator) -> Tensor:
    """The order of one epoch's examples (drawn from ``generator`` when shuffling)."""
    return torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))


def batches(
    data: ImageSet,
    order: Tensor,
    batch_size: int,
    *,
    augment: bool,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
    first: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of float batches in ``order``, from batch ``first`` on (a resumed epoch; the
    crops are drawn lazily, batch by batch, so ``generator`` must be where it stood then).
    Under data parallelism each rank takes every ``world_size``-th example, so the ranks'
    batches k together are one batch k of ``batch_size * world_size`` in a single process
    (full batches only)."""
    mine = order[rank::world_size]
    for start in range(first * batch_size, len(mine) - batch_size + 1, batch_size):
        index = mine[start : start + batch_size]
        images = data.images[index]
        if augment:
            images = random_crop(images, 4, generator)
        yield to_float(images), data.labels[index]
