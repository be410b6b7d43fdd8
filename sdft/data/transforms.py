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
class Placement:
    """Where an image lands, known before its pixels are decoded: a cache keys entries by it."""

    original_size: tuple[int, int]       # (height, width) before resizing
    resized_size: tuple[int, int]        # (height, width) after resizing to cover the target
    target_size: tuple[int, int]         # (height, width) of the crop: the square, or a bucket
    crop_top_left: tuple[int, int]       # (top, left) of the crop in the resized (and flipped) image
    flip: bool


@dataclass(frozen=True)
class ImageTransform:
    """`crop_to_mask`: with a mask, the square crop is centred on the mask's centre of mass
    (clamped to the image) instead of drawn at random or at the centre."""

    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str = "lanczos"
    crop_to_mask: bool = False

    def __call__(self, image: Image.Image, rng: random.Random, mask: Image.Image | None = None,
                 target: tuple[int, int] | None = None) -> Transformed:
        """`target`: the (height, width) to crop to, e.g. the image's aspect bucket; None: the square."""
        # The mask goes through the same decisions as the image (one code path), so any future
        # geometry (buckets, other crops) moves both alike.
        image = ImageOps.exif_transpose(image)
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, resample=Image.Resampling.BILINEAR)
        image = image.convert("RGB")
        return self.apply(image, self.place((image.height, image.width), rng, target, mask=mask), mask)

    def place(self, original_size: tuple[int, int], rng: random.Random, target: tuple[int, int] | None = None,
              mask: Image.Image | None = None, flip: bool | None = None) -> Placement:
        """The decisions of `__call__` before any pixel moves, with its draws from `rng` in its order
        (flip, then crop). A latent cache fixes `flip`; `mask` matters only with `crop_to_mask`."""
        target = target or (self.resolution, self.resolution)
        resized = cover_size(original_size, target)
        if flip is None:
            flip = self.random_flip and rng.random() < 0.5
        if self.crop_to_mask and mask is not None:
            fitted = mask.resize((resized[1], resized[0]), resample=Image.Resampling.BILINEAR)
            corner = mask_crop_corner(ImageOps.mirror(fitted) if flip else fitted, target)
        else:
            corner = crop_corner(resized[0], resized[1], target, self.center_crop, rng)
        return Placement(original_size, resized, target, corner, flip)

    def apply(self, image: Image.Image, placement: Placement, mask: Image.Image | None = None) -> Transformed:
        """Resize, flip and crop an upright RGB image (and its mask, of the same size) as
        `placement` says."""
        if placement.resized_size != placement.original_size:
            height, width = placement.resized_size
            image = image.resize((width, height), resample=RESAMPLING[self.interpolation])
        if mask is not None:
            mask = mask.resize(image.size, resample=Image.Resampling.BILINEAR)
        # Flip before cropping so the crop corner describes the pixels the model sees
        # (diffusers #6234: SDXL crop conditioning was wrong when the flip came after the crop).
        if placement.flip:
            image = ImageOps.mirror(image)
            mask = ImageOps.mirror(mask) if mask is not None else None
        (top, left), (height, width) = placement.crop_top_left, placement.target_size
        box = (left, top, left + width, top + height)
        mask_tensor = mask_to_tensor(mask.crop(box)) if mask is not None else None
        return Transformed(to_tensor(image.crop(box)), placement.original_size, (top, left), mask_tensor)


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of `size` scaled, aspect kept, to the smallest size that covers `target`.
    For a square target this is `resize_shorter_side`'s size."""
    (height, width), (target_h, target_w) = size, target
    if target_h * width >= target_w * height:   # the height is the tighter side
        return target_h, max(target_w, int(target_h * width / height))
    return max(target_h, int(target_w * height / width)), target_w


def resize_shorter_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    height, width = image.height, image.width
    if min(height, width) == size:
        return image
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    return image.resize((new_w, new_h), resample=resample)


def crop_corner(height: int, width: int, size: int | tuple[int, int], center: bool,
                rng: random.Random) -> tuple[int, int]:
    """(top, left) of a `size` crop (an int for a square, else (height, width)) of a height x width image."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if center:
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def mask_crop_corner(mask: Image.Image, size: int | tuple[int, int]) -> tuple[int, int]:
    """The corner of the `size` square centred on the mask's centre of mass, inside the image;
    an empty mask falls back to the centre."""
    weights = np.asarray(mask, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        cy, cx = (mask.height - 1) / 2.0, (mask.width - 1) / 2.0
    else:
        rows, cols = np.indices(weights.shape)
        cy, cx = (rows * weights).sum() / total, (cols * weights).sum() / total
    crop_h, crop_w = (size, size) if isinstance(size, int) else size   # a square, or (height, width)
    top = int(round(cy - (crop_h - 1) / 2.0))
    left = int(round(cx - (crop_w - 1) / 2.0))
    return min(max(top, 0), mask.height - crop_h), min(max(left, 0), mask.width - crop_w)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0).unsqueeze(0).contiguous()


def upright(image: Image.Image) -> Image.Image:
    return ImageOps.exif_transpose(image).convert("RGB")


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header without decoding pixels."""
    orientation = image.getexif().get(0x0112, 1)
    # Orientations 5-8 rotate by 90 degrees (EXIF 2.3, tag 0x0112), swapping the sides.
    return (image.width, image.height) if orientation in (5, 6, 7, 8) else (image.height, image.width)
