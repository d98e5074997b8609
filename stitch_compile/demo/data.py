"""scikit-learn's 8x8 digits as a small image-classification task with a fixed split.

Images stay 8x8 (a 4x4 patch gives a 2x2 token grid: cheap enough to train ViTs on two CPU
cores) and become 3-channel, normalised with the ImageNet mean and std like every calibration
image the ``stitch`` command reads, so files exported from here go through the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ..images import IMAGENET_MEAN, IMAGENET_STD

IMG_SIZE = 8
PATCH_SIZE = 4
NUM_CLASSES = 10
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@dataclass
class Digits:
    """Normalised [N, 3, 8, 8] images and int64 labels; the split never changes."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """Digits' [N, 8, 8] intensities in 0..16 -> normalised 3-channel images."""
    x = (pixels.float() / 16.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).contiguous()


def digits() -> Digits:
    """1347 training and 450 test images, stratified by class."""
    raw = load_digits()
    train_px, test_px, train_y, test_y = train_test_split(
        raw.images, raw.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=raw.target)
    return Digits(to_images(torch.as_tensor(train_px)), torch.as_tensor(train_y),
                  to_images(torch.as_tensor(test_px)), torch.as_tensor(test_y))
