"""Reading image files into model inputs: one preprocessing for calibration and evaluation.

RGB, resized (bicubic) so the shorter side is ``size / crop_pct``, centre-cropped to ``size``,
scaled to [0, 1] and normalised with the ImageNet mean and std (what DeiT-family anchors were
trained with). LS init's calibration images and ``accuracy --eval`` go through the same code.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import StitchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_CROP_PCT = 0.25  # smaller crops blow up the resize (1e-6: a 10^8-pixel side)
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def load_image(path: str, size: tuple[int, int], crop_pct: float = 1.0, normalize: bool = True) -> np.ndarray:
    """[3, H, W] float32 of the image at ``path`` (one clear error line if it is not an image)."""
    from PIL import Image

    height, width = size
    if not MIN_CROP_PCT <= crop_pct <= 1:
        raise StitchError(f"crop_pct {crop_pct!r}: expected {MIN_CROP_PCT} to 1 (the share of the resized image kept)")
    if not os.path.isfile(path):  # a pipe would block the read
        raise StitchError(f"{path}: not a regular file; remove it from the image folder")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = max(height, width) / crop_pct / min(img.size)
            img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
            left, top = (img.width - width) // 2, (img.height - height) // 2
            array = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    except (OSError, Image.DecompressionBombError) as exc:  # the bomb: PIL's guard against huge images
        raise StitchError(f"{path}: not a readable image ({exc.__class__.__name__}); remove or replace it") from None
    if normalize:
        array = (array - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def find_images(folder: str) -> list[str]:
    """Every image file under ``folder`` (sub-folders included), sorted."""
    return sorted(os.path.join(d, f) for d, _, names in os.walk(folder, onerror=unreadable_folder) for f in names if is_image(f))


def unreadable_folder(exc: OSError):
    """Raise for a folder that cannot be listed (os.walk's default skips it silently, and with it
    a class's images)."""
    raise StitchError(f"{exc.filename}: cannot read this folder ({exc.strerror}); fix its permissions or remove it")
