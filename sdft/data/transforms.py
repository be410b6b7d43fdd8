"""Image preprocessing with Pillow and torch only (torchvision breaks beside the pinned torch).

The transform records what it did to each image (size before resizing, crop corner), because
SDXL is conditioned on exactly those numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    # Pillow's NEAREST picks the pixel whose centre is closest, which is what torchvision calls
    # "nearest_exact"; the tiny offset of torchvision's legacy "nearest" is not worth reproducing.
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Transformed:
    pixels: torch.Tensor                 # (3, H, W) float32 in [-1, 1]
    original_size: tuple[int, int]       # (height, width) before resizing
    crop_top_left: tuple[int, int]       # (top, left) of the crop in the resized image
    mask: torch.Tensor | None = None     # (1, H, W) float32 in [0, 1], the same pixels as `pixels`


@dataclass(frozen=True)
class ImageTransform:
    """`crop_to_mask`: with a mask, the square crop is centred on the mask's centre of mass
    (clamped to the image) instead of drawn at random or at the centre."""

    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str = "lanczos"
    crop_to_mask: bool = False

    def __call__(self, image: Image.Image, rng: random.Random, mask: Image.Image | None = None) -> Transformed:
        # The mask goes through the same decisions as the image (one code path), so any future
        # geometry (buckets, other crops) moves both alike.
        image = ImageOps.exif_transpose(image)
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, resample=Image.Resampling.BILINEAR)
        image = image.convert("RGB")
        original_size = (image.height, image.width)
        image = resize_shorter_side(image, self.resolution, RESAMPLING[self.interpolation])
        if mask is not None:
            mask = mask.resize(image.size, resample=Image.Resampling.BILINEAR)
        # Flip before cropping so the crop corner describes the pixels the model sees
        # (diffusers #6234: SDXL crop conditioning was wrong when the flip came after the crop).
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
            mask = ImageOps.mirror(mask) if mask is not None else None
        if self.crop_to_mask and mask is not None:
            top, left = mask_crop_corner(mask, self.resolution)
        else:
            top, left = crop_corner(image.height, image.width, self.resolution, self.center_crop, rng)
        box = (left, top, left + self.resolution, top + self.resolution)
        image = image.crop(box)
        mask_tensor = mask_to_tensor(mask.crop(box)) if mask is not None else None
        return Transformed(to_tensor(image), original_size, (top, left), mask_tensor)


def resize_shorter_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    height, width = image.height, image.width
    if min(height, width) == size:
        return image
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    return image.resize((new_w, new_h), resample=resample)


def crop_corner(height: int, width: int, size: int, center: bool, rng: random.Random) -> tuple[int, int]:
    if center:
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return rng.randint(0, height - size), rng.randint(0, width - size)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def mask_crop_corner(mask: Image.Image, size: int) -> tuple[int, int]:
    """The corner of the `size` square centred on the mask's centre of mass, inside the image;
    an empty mask falls back to the centre."""
    weights = np.asarray(mask, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        cy, cx = (mask.height - 1) / 2.0, (mask.width - 1) / 2.0
    else:
        rows, cols = np.indices(weights.shape)
        cy, cx = (rows * weights).sum() / total, (cols * weights).sum() / total
    top = int(round(cy - (size - 1) / 2.0))
    left = int(round(cx - (size - 1) / 2.0))
    return min(max(top, 0), mask.height - size), min(max(left, 0), mask.width - size)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0).unsqueeze(0).contiguous()
