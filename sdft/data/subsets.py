"""Data as kohya users lay it out: subsets (an image folder each, with its repeats, caption options
and flip/crop), grouped into datasets (a resolution, a batch size and buckets each). Built from a
`--dataset_config` file (`sdft.data.dataset_config`) or from `N_name` folders in --train_data_dir.

An epoch follows kohya's arithmetic: every training subset contributes images x num_repeats
items; regularisation subsets (is_reg) together contribute exactly as many items as the training
subsets, their images taken round-robin (repeated when there are fewer, the last ones unused when
there are more), and their loss is weighted by --prior_loss_weight (kohya's per-sample weight).

Every batch comes from one dataset and one bucket (so resolutions never mix), drawn by the same
`BucketBatchSampler` as --enable_bucket, with each dataset's batch_size. Every random choice (crop,
flip, caption, its augmentation) is a function of (seed, epoch, item) only, as in
`sdft.data.dataset`, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import Dataset

from sdft.data.buckets import BucketPlan
from sdft.data.captions import CaptionAugment, augment_caption, caption_rng, caption_variants, short_captions
from sdft.data.dataset import collate, seeded_rng
from sdft.data.latent_cache import CacheImage, LatentCache, describe_image
from sdft.data.sources import CaptionedImages, checked_images, find_images, read_caption_file
from sdft.data.transforms import ImageTransform, Placement, Transformed, upright
from sdft.errors import DataError

logger = logging.getLogger("sdft")

# Without caption_extension: kohya's default, then the .txt files most folders hold.
DEFAULT_EXTENSIONS = [".caption", ".txt"]
FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")   # kohya's "10_sks dog": 10 repeats, class tokens "sks dog"


@dataclass(frozen=True)
class Part:
    """One loaded subset, with what its dataset decides (transform, buckets, batch size)."""

    where: str                        # "datasets[0].subsets[1]" or the folder, for logs
    images: CaptionedImages
    repeats: int
    captions: CaptionAugment
    transform: ImageTransform
    buckets: BucketPlan | None
    batch_size: int
    group: int                        # the dataset it belongs to
    is_reg: bool = False


# --------------------------------------------------------------------------- reading subsets


def subset_images(image_dir: Path | None, caption_extension: str | None, class_tokens: str | None,
                  metadata_file: Path | None, fallback_caption: str | None, where: str) -> CaptionedImages:
    """The images directly in `image_dir` (kohya does not descend into sub-folders), captioned by
    their `<stem><caption_extension>` files, else `class_tokens`, else `fallback_caption`; or the
    images and captions of kohya's fine-tuning metadata JSON."""
    if metadata_file is not None:
        paths, captions = metadata_captions(metadata_file, image_dir, where)
    else:
        paths = find_images(image_dir, recursive=False)
        if not paths:
            raise DataError(f"{where}: image_dir '{image_dir}' holds no images (they must be directly in it).")
        extensions = [caption_extension] if caption_extension else DEFAULT_EXTENSIONS
        captions = [caption_file(path, extensions) or class_tokens or fallback_caption for path in paths]
        missing = [path.name for path, caption in zip(paths, captions) if caption is None]
        if missing:
            raise DataError(f"{where}: {len(missing)} image(s) in '{image_dir}' have no caption file "
                            f"({' or '.join(repr(e) for e in extensions)}, see caption_extension) and the subset has "
                            f"no class_tokens: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "text": captions})
    return checked_images(table, "image", "text")


def caption_file(image: Path, extensions: list[str]) -> str | None:
    for extension in extensions:
        path = image.with_name(image.stem + extension)
        if path.is_file():
            return read_caption_file(path)
    return None


def metadata_captions(metadata_file: Path, image_dir: Path | None, where: str) -> tuple[list[Path], list[str]]:
    """kohya's fine-tuning metadata: {image key: {"caption": ..., "tags": ...}}; a key is an image
    path, or a file stem (or name) in image_dir. Caption and tags are joined with ", "."""
    try:
        entries = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: metadata_file '{metadata_file}' is not valid JSON: {err}") from err
    if not isinstance(entries, dict) or not entries:
        raise DataError(f"{where}: metadata_file '{metadata_file}' must be a non-empty JSON object.")
    by_stem = {p.stem: p for p in find_images(image_dir, recursive=False)} if image_dir else {}
    paths, captions = [], []
    for key, entry in entries.items():
        path = Path(key) if Path(key).is_file() else by_stem.get(Path(key).stem)
        if path is None:
            raise DataError(f"{where}: metadata_file '{metadata_file}' names the image '{key}', which is not a file "
                            f"nor an image in image_dir '{image_dir}'.")
        text = ", ".join(part for part in (entry.get("caption"), entry.get("tags")) if isinstance(part, str) and part)
        if not text:
            raise DataError(f"{where}: metadata_file '{metadata_file}': '{key}' has no caption or tags.")
        paths.append(path)
        captions.append(text)
    return paths, captions


def kohya_folders(root: Path) -> list[tuple[Path, int, str]] | None:
    """(folder, repeats, class tokens) of `root`'s `N_name` sub-folders, when `root` holds no image
    itself and every visible sub-folder is named so; None otherwise (an ordinary image folder)."""
    if not root.is_dir() or find_images(root, recursive=False):
        return None
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    matches = [FOLDER_PATTERN.match(p.name) for p in folders]
    if not folders or not all(matches):
        return None
    found = []
    for folder, match in zip(folders, matches):
        repeats = int(match.group(1))
        if repeats < 1:
            raise DataError(f"Folder '{folder}' asks for {repeats} repeats (kohya's N_name convention); N must be "
                            "at least 1.")
        found.append((folder, repeats, match.group(2).strip()))
    return found


# --------------------------------------------------------------------------- the epoch


def epoch_items(parts: list[Part]) -> list[tuple[int, int]]:
    """(part, row) of every item of an epoch, in kohya's arithmetic (module docstring)."""
    train = [(p, row) for p, part in enumerate(parts) if not part.is_reg
             for _ in range(part.repeats) for row in range(len(part.images))]
    if not train:
        raise DataError("Every subset is a regularisation subset (is_reg); there is nothing to train on.")
    pool = [(p, row) for p, part in enumerate(parts) if part.is_reg
            for _ in range(part.repeats) for row in range(len(part.images))]
    return train + ([pool[i % len(pool)] for i in range(len(train))] if pool else [])


class SubsetDataset(Dataset):
    """Items of several subsets; `reg_weight` is the loss weight of regularisation items."""

    def __init__(self, parts: list[Part], seed: int, reg_weight: float = 1.0):
        self.parts = parts
        self.items = epoch_items(parts)
        self.seed = seed
        self.reg_weight = reg_weight
        self.weighted = any(part.is_reg for part in parts)
        self.epoch = 0
        self.transform = parts[0].transform      # the interpolation all parts share, for the latent cache
        self.buckets = None
        self.held_out: Dataset | None = None
        self.latent_cache: LatentCache | None = None

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def target_size(self, index: int) -> tuple[int, int]:
        return self.row_target(*self.items[index])

    def row_target(self, p: int, row: int) -> tuple[int, int]:
        part = self.parts[p]
        if part.buckets is None:
            return (part.transform.resolution, part.transform.resolution)
        return part.buckets.bucket[row]

    def batch_plan(self) -> tuple[list[tuple], dict[tuple, int]]:
        """Each item's batch key (dataset, height, width) and each key's batch size."""
        keys = [(self.parts[p].group, *self.row_target(p, row)) for p, row in self.items]
        return keys, {key: self.parts[self.items[i][0]].batch_size for i, key in enumerate(keys)}

    def distinct_captions(self, limit: int) -> set[str] | None:
        """Every caption the text encoder can see, or None when there are more than `limit` or the
        tags are shuffled or dropped (the set then depends on the epoch)."""
        found: set[str] = set()
        for part in self.parts:
            own = part.images.distinct_captions(limit)
            variants = caption_variants(own, part.captions) if own is not None else None
            if variants is None:
                return None
            found |= variants
            if len(found) > limit:
                return None
        return found

    def caption_items(self) -> list[tuple[int, list[str], CaptionAugment]]:
        """One epoch's (item, captions, augmentation), for the caption variants a text cache holds."""
        return [(index, self.parts[p].images.captions(row), self.parts[p].captions)
                for index, (p, row) in enumerate(self.items)]

    def extra_captions(self) -> set[str]:
        return set()

    def cache_keys(self) -> list[tuple[int, int]]:
        return sorted(set(self.items))

    def cache_image(self, key: tuple[int, int]) -> CacheImage:
        p, row = key
        part = self.parts[p]
        with part.images.open_image(row, header_only=True) as header:
            return describe_image(part.transform, header, part.images.describe(row), part.images.content_identity(row),
                                  seeded_rng(self.seed, 0, hash_key(key)), target=self.row_target(p, row))

    def cache_pixels(self, key: tuple[int, int], plan: Placement) -> Transformed:
        part = self.parts[key[0]]
        return part.transform.apply(upright(part.images.open_image(key[1])), plan)

    def __getitem__(self, index: int) -> dict:
        p, row = self.items[index]
        part = self.parts[p]
        rng = seeded_rng(self.seed, self.epoch, index)
        if self.latent_cache is not None:
            item = self.latent_cache.draw((p, row), rng)
        else:
            out = part.transform(part.images.open_image(row), rng, None, self.row_target(p, row))
            item = {"pixel_values": out.pixels, "original_size": out.original_size,
                    "crop_top_left": out.crop_top_left}
        caption = rng.choice(part.images.captions(row))
        caption = augment_caption(caption, part.captions, self.epoch, caption_rng(self.seed, self.epoch, index))
        item.update(caption=caption, name=part.images.name(row))
        if self.weighted:
            item["loss_weight"] = self.reg_weight if part.is_reg else 1.0
        return item

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        batch = collate(examples)
        if "loss_weight" in examples[0]:
            batch["loss_weights"] = torch.tensor([e["loss_weight"] for e in examples], dtype=torch.float32)
        return batch


def hash_key(key: tuple[int, int]) -> int:
    """A stable integer stream id of a (part, row) cache key (the crop of its cached latent)."""
    return key[0] * 1_000_003 + key[1]


def log_epoch(dataset: SubsetDataset) -> None:
    """Per subset: images, repeats and items per epoch (kohya's arithmetic), and the total."""
    counts: dict[int, int] = {}
    for p, _ in dataset.items:
        counts[p] = counts.get(p, 0) + 1
    lines = [f"{part.where}: {len(part.images)} images x {part.repeats} repeats -> {counts.get(p, 0)} items"
             f"{' (regularisation)' if part.is_reg else ''}, {part.transform.resolution}px, batch {part.batch_size}"
             for p, part in enumerate(dataset.parts)]
    logger.info("Dataset subsets (%d items per epoch):\n  %s", len(dataset), "\n  ".join(lines))
    for part in dataset.parts:
        short = short_captions([captions[0] for captions in map(part.images.captions, range(len(part.images)))],
                               part.captions)
        if short:
            logger.warning("%s: keep_tokens %d keeps every tag of %d caption(s), so nothing of them is shuffled or "
                           "dropped: %s", part.where, part.captions.keep_tokens, len(short),
                           ", ".join(part.images.name(i) for i in short[:5]) + (" ..." if len(short) > 5 else ""))
