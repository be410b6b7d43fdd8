"""kohya sd-scripts' dataset config (`--dataset_config FILE.toml`, or .json), read as kohya defines
it (sd-scripts docs/config_README-en.md), into plain dataclasses; `sdft.builders` turns them into
a dataset.

    [general]                 keys every dataset and subset inherits
    [[datasets]]              resolution, batch_size, the bucket keys; subset keys to inherit
      [[datasets.subsets]]    image_dir (required), num_repeats, captions, is_reg, augmentation

A key set lower wins over the same key set higher. The command-line flags of the same names are
the defaults the file overrides (kohya's rule): --resolution, --train_batch_size (batch_size),
--enable_bucket and the bucket flags, --random_flip (flip_aug), --center_crop (random_crop is its
opposite here, since our default crop is random), and the caption flags (shuffle_caption, ...).

Everything is checked here, before any model loads, and every error names the file, the table
(e.g. `datasets[0].subsets[1]`) and the key. A key that is not kohya's is an error (with the
closest known key); a kohya key we do not implement is accepted only at kohya's default value,
which changes nothing, and is otherwise an error saying so.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from sdft.data.buckets import BucketSettings, bucket_sizes
from sdft.data.captions import CaptionAugment
from sdft.errors import DataError

# key -> (type, where it may be set). "dataset": [general] and [[datasets]]; "subset": all three
# levels (inherited downwards); "subset only": [[datasets.subsets]] alone.
DATASET_KEYS = {
    "resolution": "resolution", "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int,
    "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool,
}
SUBSET_KEYS = {
    "num_repeats": int, "caption_extension": str, "keep_tokens": int, "keep_tokens_separator": str,
    "shuffle_caption": bool, "caption_separator": str, "secondary_separator": str, "caption_dropout_rate": float,
    "caption_dropout_every_n_epochs": int, "caption_tag_dropout_rate": float, "flip_aug": bool, "random_crop": bool,
    "caption_prefix": str, "caption_suffix": str, "enable_wildcard": bool,
}
SUBSET_ONLY_KEYS = {"image_dir": str, "is_reg": bool, "class_tokens": str, "metadata_file": str}
# kohya keys not implemented yet, with kohya's default: that value is accepted (it changes nothing).
NOT_YET = {
    "color_aug": False, "face_crop_aug_range": None, "resize_interpolation": None, "skip_image_resolution": None,
    "cache_info": False,
    "alpha_mask": False, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "conditioning_data_dir": None, "validation_seed": None, "validation_split": 0.0,
}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              "resolution": "an integer or [width, height]",
              list: "an array of tables"}


@dataclass(frozen=True)
class SubsetSpec:
    where: str                       # "datasets[0].subsets[1]", for messages
    image_dir: Path | None
    num_repeats: int = 1
    caption_extension: str | None = None       # None: ".caption", else ".txt" (sdft.data.subsets)
    is_reg: bool = False
    class_tokens: str | None = None
    captions: CaptionAugment = CaptionAugment()
    flip_aug: bool = False
    random_crop: bool = True
    metadata_file: Path | None = None


@dataclass(frozen=True)
class DatasetSpec:
    where: str
    resolution: int
    batch_size: int
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    subsets: tuple[SubsetSpec, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DatasetConfig:
    path: Path
    datasets: tuple[DatasetSpec, ...]


def read_dataset_config(path: str | Path, defaults: dict, step_multiple: int = 8) -> DatasetConfig:
    """`defaults`: the value of every key of DATASET_KEYS and SUBSET_KEYS from the command line.
    `step_multiple`: what bucket_reso_steps must be a multiple of (8; SD3: 16)."""
    path = Path(path)
    raw = load_file(path)
    top = Table(path, "the top level", raw)
    top.only({"general", "datasets"}, "tables")
    general = Table(path, "[general]", raw.get("general", {}))
    general.check_keys({**DATASET_KEYS, **SUBSET_KEYS})
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DataError(f"{path}: no [[datasets]] table; the file needs at least one [[datasets]] with a "
                        "[[datasets.subsets]] in it.")
    specs = tuple(read_dataset(Table(path, f"datasets[{i}]", table), general, defaults, step_multiple)
                  for i, table in enumerate(datasets))
    return DatasetConfig(path, specs)


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"--dataset_config '{path}' is not a file.")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {err}") from err


class Table:
    """One table of the file, for typed reads whose errors name the file, table and key."""

    def __init__(self, path: Path, where: str, values: object):
        if not isinstance(values, dict):
            raise DataError(f"{path}: {where} must be a table, got {values!r}.")
        self.path, self.where, self.values = path, where, values

    def fail(self, key: str, problem: str) -> DataError:
        return DataError(f"{self.path}: {self.where}, key '{key}': {problem}")

    def only(self, allowed: set[str], what: str) -> None:
        for key in self.values:
            if key not in allowed:
                raise self.fail(key, f"unknown {what[:-1]}; the file may hold {', '.join(sorted(allowed))}.")

    def check_keys(self, allowed: dict) -> None:
        for key, value in self.values.items():
            if key in allowed:
                check_type(self, key, value, allowed[key])
            elif key in NOT_YET:
                if value != NOT_YET[key]:
                    raise self.fail(key, "kohya key not supported yet (only its default "
                                         f"{json.dumps(NOT_YET[key])} is accepted, which changes nothing).")
            elif key in SUBSET_ONLY_KEYS:
                raise self.fail(key, "can only be set in a [[datasets.subsets]] table.")
            elif key in DATASET_KEYS:
                raise self.fail(key, "is a dataset key: set it in [general] or [[datasets]], not in a subset.")
            else:
                near = difflib.get_close_matches(key, [*DATASET_KEYS, *SUBSET_KEYS, *SUBSET_ONLY_KEYS, *NOT_YET], 1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise self.fail(key, f"unknown key, not a kohya dataset-config key{hint}.")

    def inherited(self, key: str, parents: tuple["Table", ...], defaults: dict):
        """The value set lowest: here, else in a parent table, else the command line's."""
        for table in (self, *parents):
            if key in table.values:
                return table.values[key]
        return defaults[key]


def check_type(table: Table, key: str, value: object, kind) -> None:
    if kind == "resolution":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value))
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise table.fail(key, f"must be {TYPE_NAMES[kind]}, got {value!r}.")


def read_dataset(table: Table, general: Table, defaults: dict, step_multiple: int) -> DatasetSpec:
    table.check_keys({**DATASET_KEYS, **SUBSET_KEYS, "subsets": list})
    subsets = table.values.get("subsets")
    if not subsets:
        raise table.fail("subsets", "missing: a [[datasets]] needs at least one [[datasets.subsets]].")
    def get(key):
        return table.inherited(key, (general,), defaults)

    spec = DatasetSpec(
        where=table.where, resolution=square_resolution(table, get("resolution")), batch_size=get("batch_size"),
        enable_bucket=get("enable_bucket"), min_bucket_reso=get("min_bucket_reso"),
        max_bucket_reso=get("max_bucket_reso"), bucket_reso_steps=get("bucket_reso_steps"),
        bucket_no_upscale=get("bucket_no_upscale"),
        subsets=tuple(read_subset(Table(table.path, f"{table.where}.subsets[{i}]", s), table, general, defaults)
                      for i, s in enumerate(subsets)))
    check_dataset(table, spec, step_multiple)
    return spec


def square_resolution(table: Table, value) -> int:
    if isinstance(value, list):
        if value[0] != value[1]:
            raise table.fail("resolution", f"[width, height] must be square here ({value} is not): a non-square "
                                           "training size is not supported yet; use enable_bucket for other aspects.")
        value = value[0]
    if value <= 0:
        raise table.fail("resolution", f"must be positive, got {value}.")
    return value


def check_dataset(table: Table, spec: DatasetSpec, step_multiple: int) -> None:
    if spec.batch_size < 1:
        raise table.fail("batch_size", f"must be at least 1, got {spec.batch_size}.")
    if spec.resolution % 8:
        raise table.fail("resolution", f"must be a multiple of 8 (the VAE downsamples by 8), got {spec.resolution}.")
    if not spec.enable_bucket:
        return
    step = spec.bucket_reso_steps
    if step < step_multiple or step % step_multiple:
        raise table.fail("bucket_reso_steps", f"must be a positive multiple of {step_multiple}, got {step}.")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(spec, key)
        if value < step or value % step:
            raise table.fail(key, f"must be a multiple of bucket_reso_steps {step}, got {value}.")
    if spec.min_bucket_reso > spec.max_bucket_reso:
        raise table.fail("min_bucket_reso", f"{spec.min_bucket_reso} is larger than max_bucket_reso "
                                            f"{spec.max_bucket_reso}.")
    if not bucket_sizes(BucketSettings(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, step)):
        raise table.fail("resolution", f"no bucket of about {spec.resolution} squared pixels has both sides between "
                                       f"min_bucket_reso {spec.min_bucket_reso} and max_bucket_reso "
                                       f"{spec.max_bucket_reso}.")


def read_subset(table: Table, dataset: Table, general: Table, defaults: dict) -> SubsetSpec:
    table.check_keys({**SUBSET_KEYS, **SUBSET_ONLY_KEYS})
    def get(key):
        return table.inherited(key, (dataset, general), defaults)

    image_dir, metadata = table.values.get("image_dir"), table.values.get("metadata_file")
    if image_dir is None and metadata is None:
        raise table.fail("image_dir", "missing: every subset needs image_dir (or kohya's metadata_file).")
    base = table.path.parent
    spec = SubsetSpec(
        where=table.where, image_dir=resolve(base, image_dir), num_repeats=get("num_repeats"),
        caption_extension=get("caption_extension"), is_reg=table.values.get("is_reg", False),
        class_tokens=table.values.get("class_tokens"), flip_aug=get("flip_aug"), random_crop=get("random_crop"),
        metadata_file=resolve(base, metadata),
        captions=CaptionAugment(
            shuffle=get("shuffle_caption"), keep_tokens=get("keep_tokens"),
            keep_tokens_separator=get("keep_tokens_separator"), separator=get("caption_separator"),
            secondary_separator=get("secondary_separator"), dropout_rate=float(get("caption_dropout_rate")),
            dropout_every_n_epochs=get("caption_dropout_every_n_epochs"),
            tag_dropout_rate=float(get("caption_tag_dropout_rate")), prefix=get("caption_prefix"),
            suffix=get("caption_suffix"), wildcard=get("enable_wildcard")))
    check_subset(table, spec)
    return spec


def resolve(base: Path, value: str | None) -> Path | None:
    """A relative path is relative to the config file's folder."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def check_subset(table: Table, spec: SubsetSpec) -> None:
    if spec.image_dir is not None and not spec.image_dir.is_dir():
        raise table.fail("image_dir", f"'{spec.image_dir}' is not a folder.")
    if spec.metadata_file is not None and not spec.metadata_file.is_file():
        raise table.fail("metadata_file", f"'{spec.metadata_file}' is not a file.")
    if spec.num_repeats < 1:
        raise table.fail("num_repeats", f"must be at least 1, got {spec.num_repeats}.")
    if spec.captions.keep_tokens < 0:
        raise table.fail("keep_tokens", f"cannot be negative, got {spec.captions.keep_tokens}.")
    if spec.captions.dropout_every_n_epochs < 0:
        raise table.fail("caption_dropout_every_n_epochs",
                         f"cannot be negative, got {spec.captions.dropout_every_n_epochs}.")
    if not spec.captions.separator:
        raise table.fail("caption_separator", "cannot be empty.")
    for key, rate in (("caption_dropout_rate", spec.captions.dropout_rate),
                      ("caption_tag_dropout_rate", spec.captions.tag_dropout_rate)):
        if not 0 <= rate <= 1:
            raise table.fail(key, f"must be between 0 and 1, got {rate}.")
