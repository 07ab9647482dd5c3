"""Data pipeline: augmentation, data-parallel splits, toy densities and energy targets."""

import math

import pytest
import torch

from training.data import ImageSet, batches, epoch_order, load_mnist, random_crop
from training.toy import DENSITIES, ENERGIES, sample_density


def test_random_crop_moves_images_by_at_most_the_padding():
    images = torch.arange(2 * 28 * 28, dtype=torch.uint8).reshape(2, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    crops = random_crop(images, 4, generator)
    assert crops.shape == images.shape and crops.dtype == images.dtype
    # Each crop is the image shifted by some (dy, dx) in [-4, 4]^2, zero-filled at the border.
    for crop, image in zip(crops, images):
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        matches = [
            (dy, dx) for dy in range(9) for dx in range(9) if torch.equal(padded[:, dy : dy + 28, dx : dx + 28], crop)
        ]
        assert len(matches) == 1


def test_ranks_split_each_global_batch_between_them():
    data = ImageSet(torch.zeros(20, 1, 28, 28, dtype=torch.uint8), torch.arange(20))
    order = epoch_order(data, shuffle=False, generator=torch.Generator())
    single = [labels for _, labels in batches(data, order, 4, augment=False, generator=torch.Generator())]
    ranks = [
        [
            labels
            for _, labels in batches(data, order, 2, augment=False, generator=torch.Generator(), rank=r, world_size=2)
        ]
        for r in range(2)
    ]
    for k, labels in enumerate(single):
        assert sorted(torch.cat([ranks[0][k], ranks[1][k]]).tolist()) == sorted(labels.tolist())


def test_real_mnist_loads(mnist_dir):
    test = load_mnist(mnist_dir, train=False, download=False)
    assert len(test) == 10_000 and test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("name", sorted(DENSITIES))
def test_toy_densities_are_reproducible_two_dimensional_and_bounded(name):
    a = sample_density(name, 1000, torch.Generator().manual_seed(0))
    b = sample_density(name, 1000, torch.Generator().manual_seed(0))
    assert a.shape == (1000, 2) and torch.equal(a, b)
    assert bool(torch.isfinite(a).all()) and float(a.abs().max()) < 8
    assert float(a.std(0).min()) > 0.5  # spread out, not collapsed


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_energy_targets_are_normalizable_on_the_plane(name):
    axis = torch.linspace(-6, 6, 241, dtype=torch.float64)
    xs, ys = torch.meshgrid(axis, axis, indexing="xy")
    u = ENERGIES[name](torch.stack([xs.flatten(), ys.flatten()], 1))
    mass = float(torch.exp(-u).sum() * (12 / 240) ** 2)
    assert math.isfinite(mass) and 0.1 < mass < 100


def test_unknown_density_names_are_refused():
    with pytest.raises(ValueError, match="unknown density 'spiral'"):
        sample_density("spiral", 10, torch.Generator())
