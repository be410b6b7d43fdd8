"""Preparing a small subject data set before training: upscale, caption, mask.

Order: small images are upscaled first (captions and masks are then found on the pixels training
sees), then images without captions are captioned, then masks are attached. With several
processes each handles its share (the data folder and `--output_dir` are on a disk every process
sees), then all wait and read the same results. Every model is loaded only when it has work to do
and freed before the next one loads, so the denoiser never shares the GPU with them.

Caches, under `<output_dir>/.sdft-cache/`: upscaled images, keyed by the image's bytes and the
model's name. Written for users, in `<output_dir>`: `captions.csv` (every image's caption, given or
generated, `image_file,caption`) and `masks/` (generated masks, one PNG per image).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
from accelerate.utils import gather_object
from accelerate.utils.memory import clear_device_cache
from PIL import Image
from tqdm.auto import tqdm

from sdft.data.sources import CaptionedImages, check_captions, find_images
from sdft.errors import DataError

logger = logging.getLogger(__name__)

MASK_COLUMN = "sdft_mask"
CACHE_FOLDER = ".sdft-cache"
CAPTIONS_FILE = "captions.csv"
MASKS_FOLDER = "masks"


@dataclass(frozen=True)
class SubjectPlan:
    resolution: int
    output_dir: Path
    root: Path | None = None                  # the local data folder (names in captions.csv are relative to it)
    model_cache_dir: str | None = None
    caption_model: str | None = None
    caption_prefix: str = ""
    upscale_model: str | None = None
    mask_data_dir: str | None = None
    alpha_mask: bool = False
    mask_model: str | None = None
    mask_target_prompts: tuple[str, ...] = field(default_factory=tuple)
    need_masks: bool = False
    batch_size: int = 4

    @property
    def cache_root(self) -> Path:
        return self.output_dir / CACHE_FOLDER


def prepare_subject(images: CaptionedImages, plan: SubjectPlan, accelerator) -> CaptionedImages:
    # Names only when a file is written per image: for a Hub dataset, reading the image column
    # reads every image's bytes.
    names = relative_names(images, plan.root) if plan.caption_model or plan.need_masks else []
    images = upscale_small(images, plan, accelerator)
    if plan.caption_model:
        images = fill_captions(images, plan, accelerator)
        if accelerator.is_main_process:
            write_captions_csv(plan.output_dir / CAPTIONS_FILE, names, images)
            logger.info("Wrote every caption to %s (edit it and train again with it as the data's caption.csv)",
                        plan.output_dir / CAPTIONS_FILE)
        accelerator.wait_for_everyone()
    check_captions(images)
    if plan.need_masks:
        images = attach_masks(images, plan, accelerator, names)
    return images


def relative_names(images: CaptionedImages, root: Path | None) -> list[str]:
    """Each image's path relative to the data folder (POSIX), else its short name."""
    names = []
    for index, value in enumerate(images.table[images.image_column]):
        path = value if isinstance(value, str) else (value or {}).get("path")
        if root is not None and path and Path(path).is_relative_to(root):
            names.append(Path(path).relative_to(root).as_posix())
        else:
            names.append(images.name(index))
    return names


# --------------------------------------------------------------------------- upscaling


def image_size(images: CaptionedImages, index: int) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    value = images.table[index][images.image_column]
    source = value if isinstance(value, str) else (
        io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
    with Image.open(source) as image:
        return image.size


def upscale_small(images: CaptionedImages, plan: SubjectPlan, accelerator) -> CaptionedImages:
    if plan.root is None and plan.upscale_model is None:
        return images   # a Hub dataset: reading every header just to count is not worth it
    small = [i for i in range(len(images)) if min(image_size(images, i)) < plan.resolution]
    if not small:
        return images
    if plan.upscale_model is None:
        logger.warning("%d of %d images are smaller than --resolution %d on their shorter side and will be "
                       "resized up (blurry); --upscale_model upscales them first.", len(small), len(images),
                       plan.resolution)
        return images
    targets = {i: upscaled_path(images, i, plan) for i in small}
    todo = [i for i in small if not targets[i].is_file()]
    logger.info("Upscaling %d small image(s) (%d cached) with %s", len(todo), len(small) - len(todo),
                plan.upscale_model)
    if todo:
        _upscale(images, todo, targets, plan, accelerator)
    accelerator.wait_for_everyone()
    return with_images(images, {i: str(path) for i, path in targets.items()})


def upscaled_path(images: CaptionedImages, index: int, plan: SubjectPlan) -> Path:
    value = images.table[index][images.image_column]
    if isinstance(value, str) or value.get("bytes") is None:
        data = Path(value if isinstance(value, str) else value["path"]).read_bytes()
    else:
        data = value["bytes"]
    key = hashlib.sha256(data + b"\0" + f"{plan.upscale_model}:{plan.resolution}".encode()).hexdigest()[:16]
    return plan.cache_root / "upscaled" / key / (Path(images.name(index)).stem + ".png")


def _upscale(images: CaptionedImages, todo: list[int], targets: dict[int, Path], plan: SubjectPlan,
             accelerator) -> None:
    from sdft.data.preprocess.upscaling import Upscaler  # only runs that use this model import its classes

    with accelerator.split_between_processes(todo) as mine:
        if mine:
            upscaler = Upscaler(plan.upscale_model, accelerator.device, plan.model_cache_dir)
            for index in tqdm(mine, desc="Upscaling", disable=not accelerator.is_local_main_process):
                save_atomically(upscaler(images.open_image(index), plan.resolution), targets[index])
            del upscaler
            free_memory()


# --------------------------------------------------------------------------- captions


def fill_captions(images: CaptionedImages, plan: SubjectPlan, accelerator) -> CaptionedImages:
    missing = [i for i, value in enumerate(images.caption_column_values) if value is None]
    logger.info("%d of %d images have no caption; captioning them with %s", len(missing), len(images),
                plan.caption_model)
    if not missing:
        return images
    with accelerator.split_between_processes(missing) as mine:
        pairs = _caption(images, mine, plan, accelerator) if mine else []
    captions = dict(gather_object(pairs))
    values = [captions.get(i, value) for i, value in enumerate(images.caption_column_values)]
    table = images.table.remove_columns(images.caption_column).add_column(images.caption_column, values)
    return replace(images, table=table)


def _caption(images: CaptionedImages, mine: list[int], plan: SubjectPlan, accelerator) -> list[tuple[int, str]]:
    from sdft.data.preprocess.captioning import Captioner  # only runs that use this model import its classes

    captioner = Captioner(plan.caption_model, accelerator.device, plan.model_cache_dir)
    pairs = []
    progress = tqdm(total=len(mine), desc="Captioning", disable=not accelerator.is_local_main_process)
    for start in range(0, len(mine), plan.batch_size):
        batch = mine[start:start + plan.batch_size]
        texts = captioner([images.open_image(i) for i in batch], plan.caption_prefix)
        pairs += list(zip(batch, texts))
        progress.update(len(batch))
    progress.close()
    del captioner
    free_memory()
    return pairs


def write_captions_csv(path: Path, names: list[str], images: CaptionedImages) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_file", "caption"])
        for index, name in enumerate(names):
            writer.writerow([name, images.captions(index)[0]])


# --------------------------------------------------------------------------- masks


def attach_masks(images: CaptionedImages, plan: SubjectPlan, accelerator, names: list[str]) -> CaptionedImages:
    """A mask for every image, in order of preference: a file in --mask_data_dir with the image's
    stem, the image's alpha channel (--alpha_mask), a mask generated by --mask_model."""
    files = mask_files(Path(plan.mask_data_dir)) if plan.mask_data_dir else {}
    paths: list[str | None] = [None] * len(images)
    without = []
    for index in range(len(images)):
        found = files.get(Path(names[index]).stem)
        if found is not None:
            paths[index] = str(found)
        elif not (plan.alpha_mask and has_alpha(images.open_image(index))):
            without.append(index)
    if without and plan.mask_model:
        generated = {i: plan.output_dir / MASKS_FOLDER / Path(names[i]).with_suffix(".png") for i in without}
        _segment(images, without, generated, plan, accelerator)
        paths = [str(generated[i]) if i in generated else p for i, p in enumerate(paths)]
        logger.info("Saved %d generated mask(s) in %s", len(generated), plan.output_dir / MASKS_FOLDER)
    elif without and not plan.alpha_mask:
        shown = ", ".join(names[i] for i in without[:5]) + (" ..." if len(without) > 5 else "")
        raise DataError(f"{len(without)} image(s) have no mask in --mask_data_dir (same file stem) and neither "
                        f"--alpha_mask nor --mask_model can supply one: {shown}")
    elif without:
        logger.warning("%d image(s) have no mask file and no alpha channel; they are trained on in full.",
                       len(without))
    table = images.table.add_column(MASK_COLUMN, paths)
    return replace(images, table=table, mask_column=MASK_COLUMN, alpha_mask=plan.alpha_mask)


def mask_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"--mask_data_dir '{folder}' is not a folder.")
    files: dict[str, Path] = {}
    for path in find_images(folder):
        files.setdefault(path.stem, path)
    return files


def has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)


def _segment(images: CaptionedImages, todo: list[int], targets: dict[int, Path], plan: SubjectPlan,
             accelerator) -> None:
    from PIL import ImageOps

    from sdft.data.preprocess.masking import Segmenter  # only runs that use this model import its classes

    with accelerator.split_between_processes(todo) as mine:
        if mine:
            segmenter = Segmenter(plan.mask_model, accelerator.device, plan.model_cache_dir)
            for index in tqdm(mine, desc="Masking", disable=not accelerator.is_local_main_process):
                # Masks are in the displayed orientation (see CaptionedImages.open_mask).
                image = ImageOps.exif_transpose(images.open_image(index))
                save_atomically(segmenter(image, list(plan.mask_target_prompts)), targets[index])
            del segmenter
            free_memory()
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- shared


def with_images(images: CaptionedImages, new_paths: dict[int, str]) -> CaptionedImages:
    """The same rows with some images replaced by files (kept undecoded, like the originals)."""
    column = images.image_column
    values = [_as_kind(value, new_paths[i]) if i in new_paths else value
              for i, value in enumerate(images.table[column])]
    feature = images.table.features[column]
    table = images.table.remove_columns(column).add_column(column, values)
    if isinstance(feature, datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    return replace(images, table=table)


def _as_kind(value, path: str):
    return path if isinstance(value, str) else {"bytes": None, "path": path}


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write then rename, so an interrupted run never leaves a half-written file that looks cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)


def free_memory() -> None:
    gc.collect()
    clear_device_cache(garbage_collection=True)
