"""Normalisation and crop/flip augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.transforms import random_crop_flip, to_tensor

# (dataset, per-channel mean, per-channel std), written out here rather than imported so
# that a changed constant in models/transforms.py fails this test.
STATS = [
    ("fashion_mnist", (0.2860,), (0.3530,)),  # Fashion-MNIST train split
    ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # CIFAR-10 train split
    ("synthetic", (0.5,), (0.3,)),  # make_synthetic data
]


@pytest.mark.parametrize(("dataset", "mean", "std"), STATS)
@pytest.mark.parametrize("value", [0, 128, 255])
def test_to_tensor_normalises_per_channel(dataset: str, mean: tuple[float, ...], std: tuple[float, ...], value: int) -> None:
    channels = len(mean)
    images = np.full((2, 4, 5, channels), value, dtype=np.uint8)  # (N, H, W, C)

    x = to_tensor(images, dataset)

    assert x.shape == (2, channels, 4, 5)  # (N, C, H, W)
    assert x.dtype == torch.float32
    for c in range(channels):
        expected = (value / 255 - mean[c]) / std[c]
        torch.testing.assert_close(x[:, c], torch.full((2, 4, 5), expected), rtol=1e-5, atol=1e-5)


def test_to_tensor_moves_channels_not_pixels() -> None:
    images = np.zeros((1, 4, 5, 3), dtype=np.uint8)
    images[0, 1, 2, 0] = 255  # red at (row 1, col 2)
    images[0, 3, 4, 2] = 255  # blue at (row 3, col 4)

    x = to_tensor(images, "cifar10")
    background = to_tensor(np.zeros_like(images), "cifar10")
    lit = (x != background).nonzero().tolist()

    assert lit == [[0, 0, 1, 2], [0, 2, 3, 4]]


def test_to_tensor_accepts_non_contiguous_input() -> None:
    images = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6, 1)[:, ::2, ::2]

    x = to_tensor(images, "fashion_mnist")

    torch.testing.assert_close(x, to_tensor(images.copy(), "fashion_mnist"))


def _batch(b: int = 16, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    # Strictly positive, all distinct, so zero padding and every crop are recognisable.
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)


@pytest.mark.parametrize(
    ("shape", "pad"),
    [
        ((16, 3, 8, 8), 4),  # CIFAR-like, square
        ((5, 1, 6, 9), 2),  # grayscale, non-square
        ((1, 2, 4, 4), 0),  # single image, flip only
    ],
)
def test_random_crop_flip_keeps_shape(shape: tuple[int, int, int, int], pad: int) -> None:
    out = random_crop_flip(torch.rand(shape), pad=pad, generator=torch.Generator().manual_seed(0))

    assert out.shape == shape


def test_random_crop_flip_is_deterministic_for_a_seed() -> None:
    x = _batch()

    first = random_crop_flip(x, generator=torch.Generator().manual_seed(7))
    again = random_crop_flip(x, generator=torch.Generator().manual_seed(7))
    other = random_crop_flip(x, generator=torch.Generator().manual_seed(8))

    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_random_crop_flip_without_padding_only_flips() -> None:
    x = _batch(b=32)

    out = random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(0))

    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)  # 32 fair coins: both outcomes occur


def _crop(image: torch.Tensor, dy: int, dx: int, side: int, flip: bool) -> torch.Tensor:
    crop = image[:, dy : dy + side, dx : dx + side]  # (C, side, side)
    return crop.flip(-1) if flip else crop


def test_random_crop_flip_output_is_a_crop_of_the_padded_image() -> None:
    # Oracle: try every (dy, dx, flip) on the zero-padded input; one must match exactly.
    pad, x = 2, _batch(b=12, h=6, w=6)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))

    out = random_crop_flip(x, pad=pad, generator=torch.Generator().manual_seed(3))

    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(out[i], _crop(padded[i], dy, dx, 6, flip))
        ]
        assert len(matches) == 1, f"image {i} is not a crop(+flip) of its padded input"
        offsets.add(matches[0][:2])
    assert len(offsets) > 1  # the crop position really varies
