"""Where captioned images come from: a Hub dataset, a local dataset folder, an image folder with
`metadata.jsonl`/`metadata.csv`, or a plain folder of images (any depth) captioned by a CSV whose
name contains "caption" (`image_file,caption`) or by same-name `.txt` files. (Archives are
extracted into such a folder first: `sdft.data.archives`.)

Everything ends up as a `datasets.Dataset` whose image column holds undecoded images (a path or
bytes), so images are decoded one at a time by the training dataset and never all held in RAM.
Problems that can be seen without decoding every pixel (missing folders, unknown columns, missing
or malformed captions, unreadable image files on disk) are reported here, before any model loads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import datasets
from PIL import Image, ImageOps, UnidentifiedImageError

from sdft.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# DecompressionBombError (a header claiming more than twice Image.MAX_IMAGE_PIXELS) is not an
# OSError; without it here such a file ends in a traceback that does not name it.
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class CaptionedImages:
    table: datasets.Dataset
    image_column: str
    caption_column: str
    # Optional: a column of mask file paths (None where an image has none), and whether masks come
    # from the images' alpha channels; see `open_mask`.
    mask_column: str | None = None
    alpha_mask: bool = False

    def __len__(self) -> int:
        return len(self.table)

    def describe(self, index: int) -> str:
        value = self.table[index][self.image_column]
        path = value if isinstance(value, str) else (value or {}).get("path")
        return f"{path} (row {index})" if path else f"row {index}"

    def name(self, index: int) -> str:
        """A short, stable label for logs: the image's file name, else its row."""
        value = self.table[index][self.image_column]
        path = value if isinstance(value, str) else (value or {}).get("path")
        return Path(path).name if path else f"row-{index}"

    def open_image(self, index: int, header_only: bool = False) -> Image.Image:
        """The decoded image; with `header_only`, opened without decoding (size and EXIF only)."""
        value = self.table[index][self.image_column]
        try:
            if isinstance(value, str):
                image = Image.open(value)
            elif value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            else:
                image = Image.open(value["path"])
            if not header_only:
                image.load()
        except READ_ERRORS as err:
            raise DataError(f"Cannot read image {self.describe(index)}: {err}") from err
        return image

    def open_mask(self, index: int, image: Image.Image) -> Image.Image | None:
        """The subject mask of row `index` as a mode-"L" image (255 = subject), or None without one:
        the mask file if the row has one, else the alpha channel of `image` with `alpha_mask`.
        Masks are in the image's displayed orientation (after its EXIF rotation)."""
        path = self.table[index][self.mask_column] if self.mask_column else None
        if path:
            try:
                with Image.open(path) as mask:
                    return mask.convert("L")
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise DataError(f"Cannot read the mask {path} of {self.describe(index)}: {err}") from err
        if self.alpha_mask:
            if "A" in image.getbands() or image.mode == "P" and "transparency" in image.info:
                # Masks are in the orientation the image is shown in, as the transform sees it.
                return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
            return Image.new("L", image.size, 255)   # no alpha: the whole image is the subject
        return None

    def content_identity(self, index: int) -> str:
        """What a cache entry of this image is keyed by: its bytes' hash, or for a file on disk its
        path, size and modification time (cheap, and any rewrite of the file changes it)."""
        value = self.table[index][self.image_column]
        if not isinstance(value, str) and value.get("bytes") is not None:
            identity = "sha256:" + hashlib.sha256(value["bytes"]).hexdigest()
        else:
            identity = file_identity(Path(value if isinstance(value, str) else value["path"]))
        mask = self.table[index][self.mask_column] if self.mask_column else None
        return identity + (f"|mask:{file_identity(Path(mask))}" if mask else "") + (
            "|alpha" if self.alpha_mask else "")

    def distinct_captions(self, limit: int) -> set[str] | None:
        """All captions the data can produce, or None when there are more than `limit`."""
        found: set[str] = set()
        for index, value in enumerate(self.caption_column_values):
            found.update(caption_choices(value, self.describe(index), self.caption_column))
            if len(found) > limit:
                return None
        return found

    @cached_property
    def caption_column_values(self) -> list:
        """All captions, read once: text is small, and reading a row would also read its image bytes."""
        return list(self.table[self.caption_column])

    def captions(self, index: int) -> list[str]:
        value = self.caption_column_values[index]
        if isinstance(value, str):
            return [value]
        return caption_choices(value, self.describe(index), self.caption_column)


def file_identity(path: Path) -> str:
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def caption_choices(value: object, where: str, column: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"Caption of {where} in column '{column}' must be a string or a non-empty list of "
                    f"strings, got {value!r}.")


def load_captioned_images(*, dataset_name: str | None, dataset_config_name: str | None,
                          train_data_dir: str | None, image_column: str, caption_column: str,
                          cache_dir: str | None, max_train_samples: int | None, seed: int,
                          allow_missing_captions: bool = False) -> CaptionedImages:
    """`allow_missing_captions`: images of a plain folder without a caption get None (an
    auto-captioner fills them in) instead of an error."""
    if dataset_name is not None:
        table = load_named_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    elif _has_metadata(Path(train_data_dir)):
        table = _load_image_folder(train_data_dir, cache_dir)
    else:
        table = caption_files_table(Path(train_data_dir), image_column, caption_column,
                                    allow_missing=allow_missing_captions)
    _check_columns(table, image_column, caption_column)
    if max_train_samples is not None:
        table = table.shuffle(seed=seed).select(range(min(max_train_samples, len(table))))
    return checked_images(table, image_column, caption_column, allow_missing_captions=allow_missing_captions)


def checked_images(table: datasets.Dataset, image_column: str, caption_column: str,
                   allow_missing_captions: bool = False) -> CaptionedImages:
    """Keep images undecoded (decoded one at a time by the dataset), then check every caption and
    every image file on disk before any model is loaded."""
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    images = CaptionedImages(table, image_column, caption_column)
    if not allow_missing_captions:
        check_captions(images)
    check_local_images(images)
    return images


def load_named_dataset(name: str, config: str | None, data_dir: str | None, cache_dir: str | None):
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config, cache_dir=cache_dir, data_dir=data_dir)
    except Exception as err:  # datasets raises many types; all mean "cannot load this name"
        raise DataError(f"Could not load --dataset_name '{name}': {err}") from err
    return _load_split(loaded, f"--dataset_name '{name}'")


def _load_image_folder(folder: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir)
    except Exception as err:  # pyarrow and datasets raise many types for a malformed metadata file
        raise DataError(f"Could not read the image folder --train_data_dir '{folder}' and its metadata file: {err}") from err
    return _load_split(loaded, f"--train_data_dir '{folder}'")


def _load_split(loaded, where: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" not in loaded:
        raise DataError(f"{where} has no 'train' split (splits: {', '.join(loaded)}).")
    return loaded["train"]


def _has_metadata(folder: Path) -> bool:
    return any(next(folder.rglob(name), None) is not None for name in METADATA_FILES)


def caption_files_table(folder: Path, image_column: str, caption_column: str,
                        allow_missing: bool = False) -> datasets.Dataset:
    """A plain folder, at any depth: captions from a CSV whose name contains "caption"
    (`image_file,caption`, Replicate's layout), else from a same-stem .txt file."""
    images = find_images(folder)
    if not images:
        raise DataError(f"--train_data_dir '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                        "and no metadata.jsonl.")
    from_csv = caption_csv_captions(folder, images)
    captions = [from_csv.get(p) or txt_caption(p) for p in images]
    missing = [p for p, caption in zip(images, captions) if caption is None]
    if missing and not allow_missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} image(s) in --train_data_dir have no caption (no row in a caption CSV "
                        f"and no same-name .txt file; or give --caption_model): {shown}")
    return datasets.Dataset.from_dict({image_column: [str(p) for p in images], caption_column: captions})


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder`, sorted, skipping hidden files and folders and macOS's __MACOSX."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts))


def txt_caption(image: Path) -> str | None:
    path = image.with_suffix(".txt")
    return read_caption_file(path) if path.is_file() else None


def read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise DataError(f"Caption file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "re-save it as UTF-8.") from err


def caption_csv_captions(folder: Path, images: list[Path]) -> dict[Path, str]:
    """Captions from every CSV under `folder` whose name contains "caption". `image_file` is
    relative to the CSV's folder, or a file name found once among `images`. A row naming a
    missing image, or without a caption, is an error naming the row."""
    by_name: dict[str, list[Path]] = {}
    known = set(images)
    for image in images:
        by_name.setdefault(image.name, []).append(image)
    captions: dict[Path, str] = {}
    for table in sorted(p for p in folder.rglob("*.csv") if "caption" in p.name.lower()
                        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts)):
        for row_number, row in _csv_rows(table):
            where = f"{table} row {row_number}"
            name = (row.get("image_file") or "").strip()
            caption = (row.get("caption") or "").strip()
            image = Path(os.path.normpath(table.parent / name))
            if not name or image not in known:
                matches = by_name.get(Path(name).name, [])
                if len(matches) != 1:
                    raise DataError(f"{where} names the image '{name}', which does not exist.")
                image = matches[0]
            if not caption:
                raise DataError(f"{where} ('{name}') has no caption.")
            captions[image] = caption
    return captions


def _csv_rows(path: Path):
    """(row number, row) of a caption CSV; row 1 is the first line after the header."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image_file", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"Caption file {path} needs the columns image_file and caption; it has "
                            f"{', '.join(reader.fieldnames or []) or 'none'}.")
        yield from enumerate(list(reader), start=1)


def _check_columns(table: datasets.Dataset, image_column: str, caption_column: str) -> None:
    columns = table.column_names
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            hint = (" (for a folder of images with .txt captions, use --train_data_dir)"
                    if flag == "--image_column" and columns == ["text"] else "")
            raise DataError(f"{flag} '{column}' is not a column of the dataset; columns are: "
                            f"{', '.join(columns)}{hint}.")
    if len(table) == 0:
        raise DataError("The dataset has no rows.")


def check_captions(images: CaptionedImages) -> None:
    for index, value in enumerate(images.caption_column_values):
        if not isinstance(value, str):
            caption_choices(value, images.describe(index), images.caption_column)


def check_local_images(images: CaptionedImages, batch_size: int = 256) -> None:
    """Decode every image that lives on disk, so a corrupt or truncated file stops the run before
    training rather than hours into it. Images embedded as bytes are checked when first decoded."""
    first = images.table[0][images.image_column]
    if not isinstance(first, str) and (first or {}).get("bytes") is not None:
        return
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for start in range(0, len(images), batch_size):
            column = images.table[start:start + batch_size][images.image_column]
            paths = [value if isinstance(value, str) else value.get("path") for value in column]
            for offset, (path, error) in enumerate(zip(paths, pool.map(decode_error, paths))):
                if error is not None:
                    raise DataError(f"Cannot read image {path} (row {start + offset}): {error}")
    log_check_time(len(images), time.perf_counter() - started)


def decode_threads() -> int:
    # Pillow releases the GIL while decoding, so threads scale with cores.
    return min(8, os.cpu_count() or 1)


def decode_error(path: str | Path) -> str | None:
    """Why the file cannot be read in full, or None. For most formats Image.verify() reads the
    header only (a truncated JPEG passes it), so the pixels are decoded: JPEGs in draft mode at 1/8
    scale, which still reads every byte but is several times faster. A PNG's verify() does read
    every chunk and check its CRC, ~50x faster than decompressing it, so PNGs get that."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
                return None
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as err:
        return f"{err} Pillow refuses it as too large (Image.MAX_IMAGE_PIXELS); resize the image."
    except READ_ERRORS as err:
        return str(err) or type(err).__name__
    return None


def log_check_time(count: int, seconds: float) -> None:
    if seconds > 5:
        logger.info("Decoded all %d images to check them in %.0f s", count, seconds)
