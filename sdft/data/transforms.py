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


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str = "lanczos"

    def __call__(self, image: Image.Image, rng: random.Random) -> Transformed:
        image = ImageOps.exif_transpose(image).convert("RGB")
        original_size = (image.height, image.width)
        image = resize_shorter_side(image, self.resolution, RESAMPLING[self.interpolation])
        # Flip before cropping so the crop corner describes the pixels the model sees
        # (diffusers #6234: SDXL crop conditioning was wrong when the flip came after the crop).
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        top, left = crop_corner(image.height, image.width, self.resolution, self.center_crop, rng)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return Transformed(to_tensor(image), original_size, (top, left))


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
