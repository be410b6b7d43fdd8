"""The training dataset and its sampler.

All randomness here (shuffle order, crop, flip, caption choice) is a pure function of
(seed, epoch, index). A run resumed in the middle of an epoch therefore sees exactly the batches
an uninterrupted run would have seen, whatever happened to the global RNGs in between, and the
result does not depend on the number of data-loading workers. With aspect-ratio buckets
(`sdft.data.buckets`) the batches are drawn the same way, by `BucketBatchSampler`; `loader_order`
picks the sampler.

The epoch is set with `use_epoch` rather than `set_epoch` on purpose: accelerate calls any
`set_epoch` it finds with its own iteration counter, which restarts at 0 for the loader that
`skip_first_batches` returns on resume.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from sdft.data.buckets import BucketBatchSampler, BucketPlan, captioned_image_sizes
from sdft.data.captions import NO_AUGMENT, CaptionAugment, augment_caption, caption_rng, caption_variants
from sdft.data.latent_cache import CacheImage, LatentCache, describe_image
from sdft.data.sources import CaptionedImages
from sdft.data.transforms import ImageTransform, Placement, Transformed, upright


def seeded_rng(seed: int, epoch: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and runs.
    return random.Random(f"{seed}:{epoch}:{index}")


class CaptionedImageDataset(Dataset):
    """`empty_caption_rate` replaces captions with "" at that rate, drawn anew every epoch
    (SDXL's --proportion_empty_prompts; upstream draws once, when it precomputes embeddings).

    `captions`: kohya's caption augmentation (`sdft.data.captions`), from the caption flags.

    `buckets` (a `sdft.data.buckets.BucketPlan` over `images`, --enable_bucket) gives each image
    its own target size; without it every image is cropped to the square --resolution.
    `target_size(index)` and `placement(index, epoch)` say, without decoding pixels, what item
    `index` of an epoch is: its size, resize, crop corner and flip. `held_out` is the dataset of
    the images kept out of training for the validation loss, if any."""

    def __init__(self, images: CaptionedImages, transform: ImageTransform, seed: int, empty_caption_rate: float = 0.0,
                 buckets: BucketPlan | None = None, captions: CaptionAugment = NO_AUGMENT):
        self.images = images
        self.captions = captions
        self.transform = transform
        self.seed = seed
        self.empty_caption_rate = empty_caption_rate
        self.epoch = 0
        self.buckets = buckets
        self.held_out: Dataset | None = None
        self.latent_cache: LatentCache | None = None   # set by sdft.data.caches with --cache_latents

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        return collate(examples)

    def distinct_captions(self, limit: int) -> set[str] | None:
        found = self.images.distinct_captions(limit)
        if found is not None and self.captions.active:
            found = caption_variants(found, self.captions)
        if found is not None and self.empty_caption_rate:
            found.add("")
        return found

    def caption_items(self) -> list[tuple[int, list[str], CaptionAugment]]:
        """One epoch's (item, captions, augmentation), for the caption variants a text cache holds."""
        return [(index, self.images.captions(index), self.captions) for index in range(len(self.images))]

    def extra_captions(self) -> set[str]:
        return {""} if self.empty_caption_rate else set()

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) item `index` is cropped to: its bucket, or the square --resolution."""
        if self.buckets is None:
            return (self.transform.resolution, self.transform.resolution)
        return self.buckets.bucket[index]

    def item_buckets(self) -> list[tuple[int, int]]:
        return list(self.buckets.bucket)

    def placement(self, index: int, epoch: int | None = None) -> Placement:
        """The geometry item `index` has in `epoch` (default: the current one), as __getitem__ makes it
        (under --crop_to_mask the crop follows the mask, which this does not read)."""
        rng = seeded_rng(self.seed, self.epoch if epoch is None else epoch, index)
        size = self.buckets.sizes[index] if self.buckets is not None else captioned_image_sizes(
            self.images, index, index + 1)[0]
        return self.transform.place(size, rng, self.target_size(index))

    def cache_keys(self) -> list[int]:
        return list(range(len(self.images)))

    def cache_image(self, key: int) -> CacheImage:
        """The image's fixed plan(s) for the latent cache: the crop is drawn once, from epoch 0."""
        with self.images.open_image(key, header_only=True) as header:
            mask = self.images.open_mask(key, header) if self.transform.crop_to_mask else None
            return describe_image(self.transform, header, self.images.describe(key),
                                  self.images.content_identity(key), seeded_rng(self.seed, 0, key),
                                  target=self.target_size(key), mask=mask)

    def cache_pixels(self, key: int, plan: Placement) -> Transformed:
        image = self.images.open_image(key)
        return self.transform.apply(upright(image), plan, self.images.open_mask(key, image))

    def __getitem__(self, index: int) -> dict:
        rng = seeded_rng(self.seed, self.epoch, index)
        if self.latent_cache is not None:
            item = self.latent_cache.draw(index, rng)
        else:
            image = self.images.open_image(index)
            out = self.transform(image, rng, self.images.open_mask(index, image), self.target_size(index))
            item = {"pixel_values": out.pixels, "original_size": out.original_size,
                    "crop_top_left": out.crop_top_left}
            if out.mask is not None:
                item["mask"] = out.mask
        caption = rng.choice(self.images.captions(index))
        if self.captions.active:   # its own stream: the draws above stay as they were without it
            caption = augment_caption(caption, self.captions, self.epoch, caption_rng(self.seed, self.epoch, index))
        if self.empty_caption_rate and rng.random() < self.empty_caption_rate:
            caption = ""
        return {**item, "caption": caption, "name": self.images.name(index)}


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, derived from (seed, epoch) only."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def collate(examples: list[dict]) -> dict:
    """A batch: pixel_values (B,3,H,W) or, from the latent cache, latent_moments (B,2C,h,w);
    captions (list), original_sizes, crop_top_lefts and target_sizes (B,2) as (height, width),
    (top, left) and (height, width); masks (B,1,H,W) when the images have masks."""
    tensor_key = "latent_moments" if "latent_moments" in examples[0] else "pixel_values"
    return {
        tensor_key: torch.stack([e[tensor_key] for e in examples]).contiguous(),
        "target_sizes": target_sizes(examples, ""),
        "captions": [e["caption"] for e in examples],
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
        "names": [e["name"] for e in examples],
        **stack_masks([e.get("mask") for e in examples]),
    }


def stack_masks(masks: list[torch.Tensor | None]) -> dict:
    """{"masks": (B, 1, H, W)} when any example has a mask (the others count in full: ones), else {}."""
    if all(mask is None for mask in masks):
        return {}
    shape = next(mask for mask in masks if mask is not None).shape
    return {"masks": torch.stack([torch.ones(shape) if mask is None else mask for mask in masks]).contiguous()}


def target_sizes(examples: list[dict], prefix: str) -> torch.Tensor:
    """(height, width) of each example's pixels, or of the pixels its cached latent was made from."""
    return torch.tensor([e[prefix + "target_size"] if prefix + "target_size" in e
                         else tuple(e[prefix + "pixel_values"].shape[-2:]) for e in examples], dtype=torch.long)


def loader_order(dataset, batch_size: int, seed: int) -> tuple[object, dict]:
    """The per-epoch sampler of `dataset` and the DataLoader arguments that use it: batches of one
    bucket when the dataset has buckets, else a shuffled permutation cut into `batch_size`. A dataset
    with a `batch_plan` (`sdft.data.subsets`) says each item's group and each group's batch size."""
    if hasattr(dataset, "batch_plan"):
        keys, sizes = dataset.batch_plan()
        sampler = BucketBatchSampler(keys, batch_size, seed, batch_sizes=sizes)
        return sampler, {"batch_sampler": sampler}
    if getattr(dataset, "buckets", None) is None:
        sampler = EpochShuffleSampler(len(dataset), seed)
        return sampler, {"sampler": sampler, "batch_size": batch_size}
    sampler = BucketBatchSampler(dataset.item_buckets(), batch_size, seed)
    return sampler, {"batch_sampler": sampler}
