"""DreamBooth data: a few "instance" images of a subject, optional "class" images for prior
preservation (Ruiz et al. 2023, arXiv 2208.12242), and the generation of missing class images.

Images are opened one item at a time; upstream's `DreamBoothDataset` decodes and transforms every
instance image in `__init__` and keeps the tensors in RAM. As in `sdft.data.dataset`, every random
choice (crop, flip, caption) is a pure function of (seed, epoch, index), so a resumed run sees the
batches an uninterrupted run would have seen.

With latent caching, cached latents are looked up by the identity of the image an item shows
(("instance", i) or ("class", j)), never by the position of a batch in an epoch: upstream indexes
its cache by step over a reshuffled loader and so pairs latents with the wrong captions and the
wrong class images after the first epoch (diffusers #14430).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import datasets
import torch
from accelerate.utils.memory import clear_device_cache
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sdft.data.buckets import BucketPlan
from sdft.data.captions import NO_AUGMENT, CaptionAugment, augment_caption, caption_rng, caption_variants
from sdft.data.dataset import seeded_rng, stack_masks, target_sizes
from sdft.data.latent_cache import CacheImage, LatentCache, describe_image
from sdft.data.sources import (
    IMAGE_SUFFIXES,
    READ_ERRORS,
    CaptionedImages,
    DataError,
    caption_csv_captions,
    checked_images,
    decode_error,
    file_identity,
    find_images,
    load_named_dataset,
)
from sdft.data.transforms import ImageTransform, Placement, Transformed, upright, upright_size

logger = logging.getLogger(__name__)

# Column added to a dataset without --caption_column; unusual so it never meets a user's column.
INSTANCE_PROMPT_COLUMN = "sdft_instance_prompt"
# Class images draw their augmentation from index + CLASS_STREAM, so the crop and flip of the
# class half of an item are independent of those of its instance half.
CLASS_STREAM = 1 << 40

CacheKey = tuple[str, int]


# --------------------------------------------------------------------------- instance images


def load_instance_images(*, instance_data_dir: str | None, dataset_name: str | None,
                         dataset_config_name: str | None, image_column: str, caption_column: str | None,
                         instance_prompt: str, cache_dir: str | None, recursive: bool = False,
                         auto_caption: bool = False) -> CaptionedImages:
    """Instance images from a folder (captions from a caption CSV in it, else `instance_prompt`;
    with `auto_caption`, None for an auto-captioner to fill instead) or from a dataset (captions
    from `caption_column` if given, else `instance_prompt`). `recursive`: look in subfolders too
    (an extracted archive)."""
    if (instance_data_dir is None) == (dataset_name is None):
        raise DataError("Specify exactly one of --instance_data_dir and --dataset_name.")
    if caption_column is None and not isinstance(instance_prompt, str):
        raise DataError("--instance_prompt is required: it is the caption of every instance image.")
    if dataset_name is not None:
        return _instance_dataset(dataset_name, dataset_config_name, image_column, caption_column,
                                 instance_prompt, cache_dir)
    folder = Path(instance_data_dir)
    images = _scan_images(folder, "--instance_data_dir", recursive=recursive)
    if not images:
        raise DataError(f"--instance_data_dir '{folder}' holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))} or any other format Pillow reads).")
    own = caption_csv_captions(folder, images)
    if own:
        logger.info("%d of %d instance images are captioned by a caption CSV; the others by %s", len(own),
                    len(images), "--caption_model" if auto_caption else "--instance_prompt")
    fallback = None if auto_caption else instance_prompt
    table = datasets.Dataset.from_dict({"image": [str(p) for p in images],
                                        "prompt": [own.get(p, fallback) for p in images]})
    return CaptionedImages(table, "image", "prompt")


def _instance_dataset(dataset_name: str, config: str | None, image_column: str, caption_column: str | None,
                      instance_prompt: str, cache_dir: str | None) -> CaptionedImages:
    # Upstream passes no data_dir here: --instance_data_dir and --dataset_name exclude each other.
    table = load_named_dataset(dataset_name, config, None, cache_dir)
    _require_column(table, "--image_column", image_column)
    if caption_column is None:
        # Without --caption_column every image is captioned with --instance_prompt, as upstream;
        # the other columns are dropped so a user's own "prompt" column cannot collide.
        table = table.select_columns([image_column])
        table = table.add_column(INSTANCE_PROMPT_COLUMN, [instance_prompt] * len(table))
        caption_column = INSTANCE_PROMPT_COLUMN
    else:
        _require_column(table, "--caption_column", caption_column)
    if len(table) == 0:
        raise DataError(f"--dataset_name '{dataset_name}' has no rows.")
    return checked_images(table, image_column, caption_column)


def _require_column(table: datasets.Dataset, flag: str, column: str) -> None:
    if column not in table.column_names:
        raise DataError(f"{flag} '{column}' is not a column of the dataset; columns are: "
                        f"{', '.join(table.column_names)}.")


def _scan_images(folder: Path, flag: str, warn: bool = True, recursive: bool = False) -> list[Path]:
    """Files directly in `folder` (not recursive, as upstream, unless `recursive`: an extracted
    archive) that Pillow can open, sorted by name. Other entries are skipped with a warning; a
    corrupt file with an image suffix is an error."""
    if not folder.is_dir():
        raise DataError(f"{flag} '{folder}' does not exist or is not a folder.")
    images, skipped = [], []
    for path in (find_images(folder) if recursive else sorted(folder.iterdir())):
        (images if path.is_file() and _is_image(path) else skipped).append(path)
    if skipped and warn:
        shown = ", ".join(p.name for p in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        logger.warning("Skipping %d entries of %s '%s' that are not images: %s", len(skipped), flag, folder, shown)
    return images


def _is_image(path: Path) -> bool:
    """Decoded in full: a truncated file must fail here, not when the shuffle reaches it."""
    error = decode_error(path)
    if error is not None and path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"Cannot read image {path}: {error}")
    return error is None


def _open_class_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except READ_ERRORS as err:
        raise DataError(f"Cannot read class image {path}: {err}") from err
    return image


# --------------------------------------------------------------------------- class images


def load_class_images(class_data_dir: str | Path, recursive: bool = False) -> list[Path]:
    """Every image directly in --class_data_dir (any depth with `recursive`), sorted by file name."""
    return _scan_images(Path(class_data_dir), "--class_data_dir", recursive=recursive)


def missing_class_images(class_data_dir: str | Path, num_class_images: int, recursive: bool = False) -> int:
    """How many class images must be generated to reach `num_class_images`; creates the folder."""
    folder = Path(class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return max(0, num_class_images - len(_scan_images(folder, "--class_data_dir", warn=False, recursive=recursive)))


def generate_class_images(class_data_dir: Path, prompt: str, count: int, make_pipeline: Callable[[], object], *,
                          sample_batch_size: int, accelerator, seed: int, start_index: int,
                          num_inference_steps: int | None = None) -> None:
    """Generate `count` class images named f"{index}-{sha1[:16]}.jpg", index from `start_index`,
    the work split across processes. Image k depends only on (seed, k), not on the number of
    processes or the batch size, because each image has its own generator."""
    # Every process must have counted the existing images (missing_class_images) before any
    # process adds one, or the processes would disagree on `count` and on the split.
    accelerator.wait_for_everyone()
    if count > 0:
        _generate(Path(class_data_dir), prompt, range(start_index, start_index + count), make_pipeline,
                  sample_batch_size, accelerator, seed, num_inference_steps)
        clear_device_cache(garbage_collection=True)
    accelerator.wait_for_everyone()


def _generate(folder: Path, prompt: str, indices: range, make_pipeline, sample_batch_size: int, accelerator,
              seed: int, num_inference_steps: int | None) -> None:
    pipeline = make_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    options = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    with accelerator.split_between_processes(list(indices)) as mine:
        progress = tqdm(total=len(mine), desc="Generating class images",
                        disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), sample_batch_size):
            batch = mine[start:start + sample_batch_size]
            # One generator per image: diffusers draws image b's noise from generator[b].
            generators = [torch.Generator(device=pipeline.device).manual_seed(class_image_seed(seed, index))
                          for index in batch]
            images = pipeline(prompt=[prompt] * len(batch), generator=generators, **options).images
            for index, image in zip(batch, images):
                save_class_image(image, folder, index)
            progress.update(len(batch))
        progress.close()
    del pipeline


def class_image_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"class-image:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1   # below 2**63: any torch device accepts it


def save_class_image(image: Image.Image, folder: Path, index: int) -> Path:
    image = image.convert("RGB")
    path = folder / f"{index}-{hashlib.sha1(image.tobytes()).hexdigest()[:16]}.jpg"
    image.save(path, format="JPEG")
    return path


# --------------------------------------------------------------------------- dataset


class DreamBoothDataset(Dataset):
    """Item `index` is instance image `index % len(instance)` (so --repeats repeats every image and
    its caption) and, with prior preservation, class image `index % len(class_images)` with
    `class_prompt`. The length is the larger of the two, as upstream.

    `latent_cache`, when the trainer sets it (sdft.data.caches), holds an entry per key of
    `cache_keys`; items then carry posterior moments instead of pixels and never open an image.

    `buckets` (a `BucketPlan` over the instance images, --enable_bucket) sets each item's target
    size from its instance image; the class image paired with it is resized and cropped to the
    same bucket, so a batch's [instance half; class half] stays one tensor at any batch size.
    `held_out` is the dataset of instance images kept out of training for the validation loss."""

    def __init__(self, instance: CaptionedImages, transform: ImageTransform, seed: int, repeats: int = 1,
                 class_images: list[Path] | None = None, class_prompt: str | None = None,
                 buckets: BucketPlan | None = None, captions: CaptionAugment = NO_AUGMENT):
        if repeats < 1:
            raise DataError(f"--repeats must be at least 1, got {repeats}.")
        if len(instance) == 0:
            raise DataError("There are no instance images.")
        if class_images is not None and not class_images:
            # Upstream divides by zero here (index % 0) with --num_class_images 0.
            raise DataError("Prior preservation needs class images, but none were found in --class_data_dir "
                            "(is --num_class_images 0?).")
        if class_images is not None and not isinstance(class_prompt, str):
            raise DataError("Prior preservation needs --class_prompt.")
        self.instance = instance
        self.transform = transform
        self.seed = seed
        self.repeats = repeats
        self.captions = captions   # kohya's caption augmentation of the instance captions
        self.class_images = [Path(p) for p in class_images] if class_images else None
        self.class_prompt = class_prompt
        self.epoch = 0
        self.buckets = buckets
        self.held_out: Dataset | None = None
        self.latent_cache: LatentCache | None = None

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance) * self.repeats, len(self.class_images) if self.class_images else 0)

    def __getitem__(self, index: int) -> dict:
        rng = seeded_rng(self.seed, self.epoch, index)
        row = index % len(self.instance)
        # The caption is drawn before the image so it is the same with and without a latent cache.
        item = {"caption": rng.choice(self.instance.captions(row)), "name": self.instance.name(row)}
        if self.captions.active:   # its own stream: the crop and flip draws stay as they were without it
            item["caption"] = augment_caption(item["caption"], self.captions, self.epoch,
                                              caption_rng(self.seed, self.epoch, index))
        item.update(self._image(("instance", row), rng, prefix="", target=self.target_size(index)))
        if self.class_images:
            slot = index % len(self.class_images)
            item["class_caption"] = self.class_prompt
            item["class_name"] = self.class_images[slot].name
            class_rng = seeded_rng(self.seed, self.epoch, CLASS_STREAM + index)
            item.update(self._image(("class", slot), class_rng, prefix="class_", target=self.target_size(index)))
        return item

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index`, class half included: its instance image's bucket, or
        the square --resolution."""
        if self.buckets is None:
            return (self.transform.resolution, self.transform.resolution)
        return self.buckets.bucket[index % len(self.instance)]

    def item_buckets(self) -> list[tuple[int, int]]:
        return [self.target_size(index) for index in range(len(self))]

    def distinct_captions(self, limit: int) -> set[str] | None:
        """Every caption an item can carry, class prompt included, or None if there are more than
        `limit` (the trainer then encodes captions per step instead of once)."""
        found = self.instance.distinct_captions(limit)
        if found is not None and self.captions.active:
            found = caption_variants(found, self.captions)
        if found is not None and self.class_images:
            found.add(self.class_prompt)
        return found if found is not None and len(found) <= limit else None

    def caption_items(self) -> list[tuple[int, list[str], CaptionAugment]]:
        """One epoch's (item, instance captions, augmentation), for the caption variants a text cache holds."""
        return [(index, self.instance.captions(index % len(self.instance)), self.captions)
                for index in range(len(self))]

    def extra_captions(self) -> set[str]:
        return {self.class_prompt} if self.class_images else set()

    def cache_keys(self) -> list[CacheKey]:
        keys = [("instance", i) for i in range(len(self.instance))]
        return keys + [("class", j) for j in range(len(self.class_images or []))]

    def cache_image(self, key: CacheKey) -> CacheImage:
        """The image's fixed placement(s) for the latent cache (the cache is encoded once, so the
        crop drawn here is the one training sees in every epoch; the flip still varies)."""
        kind, position = key
        if self.buckets is not None and self.class_images:
            # A class image takes the bucket of each instance image it is paired with, so one
            # cached latent per class image would have the wrong size for some of its pairs.
            raise DataError("--cache_latents with --enable_bucket does not support --with_prior_preservation.")
        stream = position if kind == "instance" else CLASS_STREAM + position
        if kind == "instance":
            label, identity = self.instance.describe(position), self.instance.content_identity(position)
            header = self.instance.open_image(position, header_only=True)
        else:
            path = self.class_images[position]
            label, identity, header = str(path), file_identity(path), Image.open(path)
        with header:
            mask = self._mask(key, header) if self.transform.crop_to_mask else None
            return describe_image(self.transform, header, label, identity, seeded_rng(self.seed, 0, stream),
                                  target=self.target_size(position) if kind == "instance" else None, mask=mask)

    def cache_pixels(self, key: CacheKey, plan: Placement) -> Transformed:
        image = self._open(key)
        return self.transform.apply(upright(image), plan, self._mask(key, image))

    def _mask(self, key: CacheKey, image: Image.Image) -> Image.Image | None:
        """Instance images carry their masks; class images have none, so the prior-preservation
        half of a batch is never masked."""
        mask = self.instance.open_mask(key[1], image) if key[0] == "instance" else None
        height, width = upright_size(image)
        if mask is not None and mask.size != (width, height):
            mask = mask.resize((width, height), resample=Image.Resampling.BILINEAR)
        return mask

    def _image(self, key: CacheKey, rng, prefix: str, target: tuple[int, int]) -> dict:
        if self.latent_cache is not None:
            return {prefix + name: value for name, value in self.latent_cache.draw(key, rng).items()}
        out = self._transform(key, rng, target)
        item = {prefix + "pixel_values": out.pixels, prefix + "original_size": out.original_size,
                prefix + "crop_top_left": out.crop_top_left, prefix + "target_size": target}
        if out.mask is not None:
            item[prefix + "mask"] = out.mask
        return item

    def _transform(self, key: CacheKey, rng, target: tuple[int, int] | None = None) -> Transformed:
        image = self._open(key)
        return self.transform(image, rng, self._mask(key, image), target)

    def _open(self, key: CacheKey) -> Image.Image:
        kind, position = key
        if kind == "instance":
            return self.instance.open_image(position)
        return _open_class_image(self.class_images[position])

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        """Instance examples first, then (prior preservation) their class examples, so the batch is
        [instance half; class half] as `sdft.objectives.split_prior` expects."""
        tensor_key = "latent_moments" if "latent_moments" in examples[0] else "pixel_values"
        prefixes = [""] + (["class_"] if "class_caption" in examples[0] else [])
        rows = [(e, p) for p in prefixes for e in examples]
        return {
            tensor_key: torch.stack([e[p + tensor_key] for e, p in rows]).contiguous(),
            "captions": [e[p + "caption"] for e, p in rows],
            "original_sizes": torch.tensor([e[p + "original_size"] for e, p in rows], dtype=torch.long),
            "crop_top_lefts": torch.tensor([e[p + "crop_top_left"] for e, p in rows], dtype=torch.long),
            "names": [e[p + "name"] for e, p in rows],
            "num_instance": len(examples),
            **stack_masks([e.get(p + "mask") for e, p in rows]),
            "target_sizes": torch.cat([target_sizes([e], p) for e, p in rows]),
        }
