"""Aspect-ratio buckets (--enable_bucket), with kohya sd-scripts' flags and meaning.

Bucket sizes have about --resolution² pixels and sides that are multiples of --bucket_reso_steps
between --min_bucket_reso and --max_bucket_reso. Each image goes to the bucket closest to its
aspect ratio (compared on a log scale, so a 2:1 and a 1:2 image are equally far from square); the
transform resizes it to cover the bucket and crops it (`sdft.data.transforms`). With
--bucket_no_upscale an image that its bucket would enlarge gets a bucket of its own instead: its
sides rounded down to multiples of the step (at least one step; at most --max_bucket_reso and
--resolution² pixels), so it is only cropped, never enlarged (kohya does the same with its
"no upscale" buckets).

The bucket of an image is fixed by its size, so the number of batches per epoch is the same in
every epoch. `BucketBatchSampler` shuffles each bucket and the order of the batches from
(seed, epoch) alone, which keeps mid-epoch resume exact. Every batch holds images of one bucket.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from sdft.data.sources import CaptionedImages
from sdft.errors import DataError

logger = logging.getLogger(__name__)

Size = tuple[int, int]   # (height, width)
# EXIF orientations that swap width and height (ImageOps.exif_transpose turns them upright).
_TRANSPOSED = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class BucketSettings:
    resolution: int
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False


def bucket_sizes(settings: BucketSettings) -> list[Size]:
    """For every width w in [min_reso, max_reso] that is a multiple of `step`: (h, w) and (w, h),
    h the tallest multiple of `step` up to max_reso with h·w <= resolution², when h >= min_reso;
    plus the square. Sorted from the tallest to the widest."""
    area = settings.resolution ** 2
    sizes = set()
    square = math.isqrt(area) // settings.step * settings.step
    if settings.min_reso <= square <= settings.max_reso:
        sizes.add((square, square))
    first = -(-settings.min_reso // settings.step) * settings.step
    for width in range(first, settings.max_reso + 1, settings.step):
        height = min(settings.max_reso, area // width // settings.step * settings.step)
        if height >= settings.min_reso:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda s: (s[1] / s[0], s[0]))


def closest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    aspect = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def own_bucket(size: Size, settings: BucketSettings) -> Size:
    """--bucket_no_upscale: the largest step-multiple size inside the image (and the limits)."""
    height, width = size
    scale = min(1.0, math.sqrt(settings.resolution ** 2 / (height * width)))
    return tuple(max(settings.step, min(settings.max_reso, int(side * scale) // settings.step * settings.step))
                 for side in (height, width))


def bucket_for(size: Size, buckets: Sequence[Size], settings: BucketSettings) -> Size:
    bucket = closest_bucket(size, buckets)
    if settings.no_upscale and (bucket[0] > size[0] or bucket[1] > size[1]):
        return own_bucket(size, settings)
    return bucket


@dataclass(frozen=True)
class BucketPlan:
    """`sizes[i]` is the (height, width) of image i of a source; `bucket[i]` its bucket."""

    sizes: tuple[Size, ...]
    bucket: tuple[Size, ...]

    @classmethod
    def build(cls, sizes: Sequence[Size], settings: BucketSettings) -> "BucketPlan":
        buckets = bucket_sizes(settings)
        if not buckets:
            raise DataError(f"No bucket fits --resolution {settings.resolution} between --min_bucket_reso "
                            f"{settings.min_reso} and --max_bucket_reso {settings.max_reso}.")
        return cls(tuple(sizes), tuple(bucket_for(size, buckets, settings) for size in sizes))

    def counts(self) -> dict[Size, int]:
        return dict(sorted(Counter(self.bucket).items(), key=lambda kv: (kv[0][1] / kv[0][0], kv[0][0])))

    def table(self) -> str:
        lines = ["bucket (h x w)   aspect   images"]
        lines += [f"{h:>6} x {w:<6}   {w / h:6.2f}   {n:>6}" for (h, w), n in self.counts().items()]
        return "\n".join(lines)


def log_plan(plan: BucketPlan, name_of: Callable[[int], str], settings: BucketSettings,
             what: str = "training") -> None:
    """The bucket table, and the images smaller than --min_bucket_reso (named, up to 10)."""
    logger.info("Aspect-ratio buckets of the %s images (%d buckets):\n%s", what, len(plan.counts()), plan.table())
    small = [index for index, size in enumerate(plan.sizes) if min(size) < settings.min_reso]
    if small:
        shown = ", ".join(f"{name_of(i)} ({plan.sizes[i][0]}x{plan.sizes[i][1]})" for i in small[:10])
        shown += " ..." if len(small) > 10 else ""
        fate = "get buckets of their own" if settings.no_upscale else "are enlarged to fit their buckets"
        logger.warning("%d %s image(s) have a side below --min_bucket_reso %d and %s: %s",
                       len(small), what, settings.min_reso, fate, shown)


# --------------------------------------------------------------------------- image sizes


def upright_size(image: Image.Image) -> Size:
    """(height, width) after EXIF orientation, read from the header without decoding pixels."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
        width, height = height, width
    return height, width


def file_size(path) -> Size:
    try:
        with Image.open(path) as image:
            return upright_size(image)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"Cannot read image {path}: {err}") from err


def captioned_image_sizes(images: CaptionedImages, start: int = 0, stop: int | None = None,
                          batch_size: int = 256) -> list[Size]:
    """The upright size of images start..stop of `images`, from the file headers, read in slices."""
    sizes = []
    stop = len(images) if stop is None else stop
    for first in range(start, stop, batch_size):
        column = images.table[first:min(stop, first + batch_size)][images.image_column]
        for offset, value in enumerate(column):
            if isinstance(value, str):
                sizes.append(file_size(value))
            elif value.get("bytes") is not None:
                try:
                    sizes.append(file_size(io.BytesIO(value["bytes"])))
                except DataError as err:
                    raise DataError(f"Cannot read image {images.describe(first + offset)}: {err}") from err
            else:
                sizes.append(file_size(value["path"]))
    return sizes


# --------------------------------------------------------------------------- batch order


class BucketBatchSampler:
    """Batches of one bucket each: every bucket's items shuffled, cut into batches of `batch_size`
    (the last one of a bucket may be smaller), and the batches shuffled, all from (seed, epoch).

    Deliberately no `batch_size` attribute: with one, accelerate's BatchSamplerShard yields a
    group of per-process batches only when the group's last batch is full, so it would silently
    drop the groups that end on a bucket's smaller last batch. Without it, the batches count as
    variable-sized: each process gets whole batches round-robin, and the epoch is padded with its
    first batches to a multiple of the process count, as for any sampler."""

    def __init__(self, item_buckets: Sequence[tuple], batch_size: int, seed: int,
                 batch_sizes: dict[tuple, int] | None = None):
        """`item_buckets`: each item's group key, a bucket (height, width) or any sortable tuple
        (a `--dataset_config` run keys by (dataset, height, width)); `batch_sizes`: a key's own
        batch size, else `batch_size`."""
        self.batch_size_limit = batch_size
        self.seed = seed
        self.epoch = 0
        groups: dict[tuple, list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = [groups[key] for key in sorted(groups)]
        self.sizes = [(batch_sizes or {}).get(key, batch_size) for key in sorted(groups)]

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / size) for group, size in zip(self.groups, self.sizes))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for group, size in zip(self.groups, self.sizes):
            order = torch.randperm(len(group), generator=generator).tolist()
            shuffled = [group[i] for i in order]
            batches += [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
