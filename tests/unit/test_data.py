"""Training data: where captioned images come from, how they are transformed, how they are batched."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image, ImageOps

from sdft.data.dataset import CaptionedImageDataset, EpochShuffleSampler, collate
from sdft.data.sources import DataError, load_captioned_images
from sdft.data.transforms import ImageTransform, crop_corner, resize_shorter_side, to_tensor
from sdft.tiny import make_images

RED, BLUE = (255, 0, 0), (0, 0, 255)
RED_T, BLUE_T = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


def load(cache_dir: str, train_data_dir=None, **overrides):
    kwargs = dict(dataset_name=None, dataset_config_name=None, train_data_dir=None if train_data_dir is None
                  else str(train_data_dir), image_column="image", caption_column="text", cache_dir=cache_dir,
                  max_train_samples=None, seed=0)
    kwargs.update(overrides)
    return load_captioned_images(**kwargs)


def read_metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def write_metadata(folder: Path, records: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def image_path(images, index: int) -> str:
    value = images.table[index][images.image_column]
    return value if isinstance(value, str) else value["path"]


def two_colour(width: int, height: int, split: int) -> Image.Image:
    """Red left of column `split`, blue from it on."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, split, height))
    return image


# --------------------------------------------------------------------------- sources


def test_imagefolder_with_metadata_jsonl(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=6, layout="metadata")
    expected = {r["file_name"]: r["text"] for r in read_metadata(folder)}
    images = load(cache_dir, folder)
    assert len(images) == 6
    seen = {Path(image_path(images, i)).name: images.captions(i) for i in range(len(images))}
    assert seen == {name: [text] for name, text in expected.items()}
    assert images.open_image(0).size[0] > 0


def test_plain_folder_with_txt_captions_sorted_and_stripped(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=4, layout="captions")
    (folder / "image_001.txt").write_text("  a caption with spaces around \n\n", encoding="utf-8")
    images = load(cache_dir, folder)
    paths = [image_path(images, i) for i in range(len(images))]
    assert [Path(p).name for p in paths] == ["image_000.png", "image_001.jpg", "image_002.png", "image_003.jpg"]
    assert images.captions(1) == ["a caption with spaces around"]
    for i, path in enumerate(paths):
        assert images.captions(i) == [Path(path).with_suffix(".txt").read_text(encoding="utf-8").strip()]


def test_image_without_caption_file_is_named(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=3, layout="captions")
    (folder / "image_002.txt").unlink()
    with pytest.raises(DataError, match="image_002.png") as exc:
        load(cache_dir, folder)
    assert "image_000" not in str(exc.value) and ".txt" in str(exc.value)


@pytest.mark.parametrize("content", ["empty", "only-text-files"])
def test_folder_without_images(tmp_path, cache_dir, content):
    folder = tmp_path / "data"
    folder.mkdir()
    if content == "only-text-files":
        (folder / "notes.txt").write_text("a caption without an image")
    with pytest.raises(DataError, match="no images"):
        load(cache_dir, folder)


@pytest.mark.parametrize("layout", ["metadata", "captions"])
def test_corrupt_image_is_reported_before_training(tmp_path, cache_dir, layout):
    folder = make_images(tmp_path / "data", num_images=4, layout=layout)
    corrupt = folder / "image_002.png"
    corrupt.write_bytes(b"this is not a png" * 20)
    with pytest.raises(DataError) as exc:
        load(cache_dir, folder)
    assert str(corrupt) in str(exc.value)


@pytest.mark.parametrize("flag, overrides, bad", [
    ("--caption_column", {"caption_column": "caption"}, "caption"),
    ("--image_column", {"image_column": "picture"}, "picture"),
])
def test_unknown_column_lists_the_real_ones(tmp_path, cache_dir, flag, overrides, bad):
    folder = make_images(tmp_path / "data", num_images=2, layout="metadata")
    with pytest.raises(DataError) as exc:
        load(cache_dir, folder, **overrides)
    message = str(exc.value)
    assert flag in message and f"'{bad}'" in message
    assert "image" in message.split("columns are:")[1] and "text" in message.split("columns are:")[1]


def test_list_caption_picks_one_of_its_entries(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=2, layout="metadata")
    records = read_metadata(folder)
    for record in records:
        record["text"] = [record["text"], "an alternative caption"]
    write_metadata(folder, records)
    images = load(cache_dir, folder)
    dataset = CaptionedImageDataset(images, ImageTransform(32, center_crop=True, random_flip=False), seed=0)
    for index in range(len(images)):
        options = images.captions(index)
        assert len(options) == 2
        picked = set()
        for epoch in range(12):
            dataset.use_epoch(epoch)
            caption = dataset[index]["caption"]
            assert caption in options
            picked.add(caption)
        assert picked == set(options), "over 12 epochs both captions should be used"


def test_none_caption_names_the_row(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=4, layout="metadata")
    records = read_metadata(folder)
    records[2]["text"] = None
    write_metadata(folder, records)
    with pytest.raises(DataError) as exc:
        load(cache_dir, folder)
    assert "row 2" in str(exc.value) and "image_002.png" in str(exc.value)


@pytest.mark.parametrize("problem, row", [("number caption", 2), ("malformed line", 4)])
def test_bad_metadata_jsonl_is_a_data_error_naming_the_row(tmp_path, cache_dir, problem, row):
    # A user's metadata.jsonl with a numeric caption or a broken line must give a DataError
    # (which the scripts print as a one-line error naming the data), not a pyarrow traceback.
    folder = make_images(tmp_path / "data", num_images=4, layout="metadata")
    records = read_metadata(folder)
    if problem == "number caption":
        records[2]["text"] = 5
        write_metadata(folder, records)
    else:
        write_metadata(folder, records)
        with open(folder / "metadata.jsonl", "a") as f:
            f.write('{"file_name": "image_000.png", "text": "unterminated\n')
    with pytest.raises(DataError) as exc:
        load(cache_dir, folder)
    message = str(exc.value)
    assert f"row {row}" in message
    assert "metadata.jsonl" in message or str(folder) in message


def test_number_caption_in_saved_dataset_names_the_row(tmp_path, cache_dir):
    folder = make_images(tmp_path / "images", num_images=2, layout="images")
    paths = sorted(str(p) for p in folder.iterdir())
    table = datasets.Dataset.from_dict({"image": paths, "text": [7, 8]})
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as exc:
        load(cache_dir, dataset_name=str(tmp_path / "saved"))
    assert "row 0" in str(exc.value) and "'text'" in str(exc.value)


def test_max_train_samples_is_deterministic_for_a_seed(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=8, layout="captions")

    def names(seed: int) -> list[str]:
        images = load(cache_dir, folder, max_train_samples=3, seed=seed)
        assert len(images) == 3
        return [Path(image_path(images, i)).name for i in range(3)]

    assert names(0) == names(0)
    assert {tuple(names(seed)) for seed in range(6)} != {tuple(names(0))}, "the seed should change the subset"
    assert len(load(cache_dir, folder, max_train_samples=100)) == 8


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_name_can_be_a_save_to_disk_folder(tmp_path, cache_dir, as_dict):
    folder = make_images(tmp_path / "images", num_images=3, layout="images")
    paths = sorted(str(p) for p in folder.iterdir())
    captions = [f"caption {i}" for i in range(3)]
    table = datasets.Dataset.from_dict({"image": paths, "text": captions}).cast_column("image", datasets.Image())
    saved = tmp_path / "saved"
    (datasets.DatasetDict({"train": table}) if as_dict else table).save_to_disk(str(saved))
    images = load(cache_dir, dataset_name=str(saved))
    assert len(images) == 3
    assert [images.captions(i) for i in range(3)] == [[c] for c in captions]
    assert images.open_image(2).size == Image.open(paths[2]).size


def test_dataset_name_can_be_a_local_imagefolder(tmp_path, cache_dir):
    folder = make_images(tmp_path / "data", num_images=3, layout="metadata")
    images = load(cache_dir, dataset_name=str(folder))
    assert len(images) == 3
    expected = {r["file_name"]: [r["text"]] for r in read_metadata(folder)}
    assert {Path(image_path(images, i)).name: images.captions(i) for i in range(3)} == expected


def test_dataset_name_that_cannot_be_loaded_offline(cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as exc:
        load(cache_dir, dataset_name="nobody-here/no-such-dataset")
    assert "--dataset_name" in str(exc.value) and "nobody-here/no-such-dataset" in str(exc.value)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size, expected", [
    ((64, 40), (51, 32)),   # landscape (width, height): height -> 32, width int(32 * 64 / 40)
    ((40, 72), (32, 57)),   # portrait: width -> 32, height int(32 * 72 / 40)
    ((56, 56), (32, 32)),   # square
    ((32, 80), (32, 80)),   # shorter side already right: untouched
    ((20, 16), (40, 32)),   # upscaling
])
def test_resize_shorter_side(size, expected):
    out = resize_shorter_side(Image.new("RGB", size), 32, Image.Resampling.BILINEAR)
    assert out.size == expected


@pytest.mark.parametrize("width, height, corner", [
    (75, 32, (0, 22)),    # round(43 / 2) = 22
    (77, 32, (0, 22)),    # round(45 / 2) = 22 (half to even, as torchvision's center_crop)
    (32, 51, (10, 0)),    # round(19 / 2) = 10
    (32, 32, (0, 0)),
    (40, 72, (12, 0)),    # resized to 32 x 57: round(25 / 2) = 12
])
def test_center_crop_corner(width, height, corner):
    transform = ImageTransform(32, center_crop=True, random_flip=False, interpolation="nearest")
    out = transform(Image.new("RGB", (width, height)), random.Random(0))
    resized = resize_shorter_side(Image.new("RGB", (width, height)), 32, Image.Resampling.NEAREST)
    assert out.crop_top_left == (round((resized.height - 32) / 2), round((resized.width - 32) / 2)) == corner
    assert out.pixels.shape == (3, 32, 32)


def test_random_crop_corners_in_range_and_varying():
    corners = {crop_corner(40, 57, 32, center=False, rng=random.Random(seed)) for seed in range(50)}
    assert all(0 <= top <= 8 and 0 <= left <= 25 for top, left in corners)
    assert len(corners) > 10
    transform = ImageTransform(32, center_crop=False, random_flip=False)
    outs = [transform(Image.new("RGB", (57, 40)), random.Random(seed)) for seed in range(20)]
    assert all(o.pixels.shape == (3, 32, 32) for o in outs)
    assert len({o.crop_top_left for o in outs}) > 3


def test_output_tensor_shape_range_dtype():
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 24, 40))
    out = ImageTransform(32, center_crop=True, random_flip=False, interpolation="nearest")(image, random.Random(0))
    assert out.pixels.shape == (3, 32, 32) and out.pixels.dtype == torch.float32
    assert out.pixels.min().item() == -1.0 and out.pixels.max().item() == 1.0
    gray = ImageTransform(16, True, False)(Image.new("L", (16, 16), 128), random.Random(0)).pixels
    assert gray.shape == (3, 16, 16) and torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=1e-6)


def first_draw_flips(flip: bool) -> random.Random:
    """An rng whose first random() decides a flip (< 0.5) or not."""
    for seed in range(100):
        if (random.Random(seed).random() < 0.5) == flip:
            return random.Random(seed)
    raise AssertionError("unreachable")


def test_flip_with_center_crop_is_the_exact_mirror():
    # 64x32 at 32: no resize, crop columns 16..47, of which 16..23 are red and 24..47 blue.
    image = two_colour(64, 32, split=24)
    transform = ImageTransform(32, center_crop=True, random_flip=True, interpolation="nearest")
    plain = transform(image, first_draw_flips(False)).pixels
    flipped = transform(image, first_draw_flips(True)).pixels
    assert torch.equal(plain[:, :, :8], RED_T[:, None, None].expand(3, 32, 8))
    assert torch.equal(plain[:, :, 8:], BLUE_T[:, None, None].expand(3, 32, 24))
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert not torch.equal(flipped, plain)


def test_crop_corner_describes_the_pixels_seen_after_a_flip():
    # Flip first, then crop: the reported corner locates the output in the (possibly mirrored)
    # resized image, which is what SDXL's crop conditioning needs (diffusers #6234).
    columns = Image.new("RGB", (80, 32))   # every column a different colour
    columns.putdata([(x * 3, 255 - x * 3, (x * 7) % 256) for _ in range(32) for x in range(80)])
    transform = ImageTransform(32, center_crop=False, random_flip=True, interpolation="nearest")
    outcomes = set()
    for seed in range(40):
        out = transform(columns, random.Random(seed))
        top, left = out.crop_top_left
        box = (left, top, left + 32, top + 32)
        as_is = to_tensor(columns.crop(box))
        mirrored = to_tensor(ImageOps.mirror(columns).crop(box))
        if torch.equal(out.pixels, as_is):
            outcomes.add("plain")
        elif torch.equal(out.pixels, mirrored):
            outcomes.add("flipped")
        else:
            raise AssertionError(f"seed {seed}: output is not the crop at {out.crop_top_left} of the image or its mirror")
    assert outcomes == {"plain", "flipped"}


def test_original_size_is_height_width_before_resizing():
    out = ImageTransform(32, center_crop=True, random_flip=False)(Image.new("RGB", (64, 40)), random.Random(0))
    assert out.original_size == (40, 64)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 64 wide x 32 high, red left half; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the displayed image is 32 x 64 with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    two_colour(64, 32, split=32).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    out = ImageTransform(32, center_crop=True, random_flip=False)(Image.open(path), random.Random(0))
    assert out.original_size == (64, 32)
    # Crop rows 16..47 of the displayed image: rows 16..31 red, 32..47 blue.
    top = out.pixels[:, 2:14, :].mean(dim=(1, 2))
    bottom = out.pixels[:, 18:30, :].mean(dim=(1, 2))
    assert torch.allclose(top, RED_T, atol=0.1), top
    assert torch.allclose(bottom, BLUE_T, atol=0.1), bottom


# --------------------------------------------------------------------------- dataset, sampler, collate


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory, cache_dir):
    folder = make_images(tmp_path_factory.mktemp("data") / "set", num_images=4, layout="metadata")
    return load(cache_dir, folder)


def same_item(a: dict, b: dict) -> bool:
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
            and a["original_size"] == b["original_size"] and a["crop_top_left"] == b["crop_top_left"])


def test_dataset_item_is_a_function_of_seed_epoch_index(tiny_images):
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    first = CaptionedImageDataset(tiny_images, transform, seed=3)
    second = CaptionedImageDataset(tiny_images, transform, seed=3)
    first.use_epoch(2)
    second.use_epoch(2)
    for index in (3, 0, 3):
        assert same_item(first[index], second[index])
    item = first[1]
    assert item["pixel_values"].shape == (3, 32, 32) and isinstance(item["caption"], str)


def test_dataset_items_change_across_epochs_with_random_crop_and_flip(tiny_images):
    dataset = CaptionedImageDataset(tiny_images, ImageTransform(32, center_crop=False, random_flip=True), seed=0)
    first_epoch = []
    for index in range(len(dataset)):
        seen = []
        for epoch in range(8):
            dataset.use_epoch(epoch)
            seen.append(dataset[index])
        assert any(not same_item(seen[0], other) for other in seen[1:]), f"item {index} never changed over 8 epochs"
        first_epoch.append(seen[0])
    dataset.use_epoch(0)   # going back to an epoch (as a resumed run does) gives its items again
    assert all(same_item(dataset[i], first_epoch[i]) for i in range(len(dataset)))


def test_dataset_without_augmentation_is_the_same_every_epoch(tiny_images):
    dataset = CaptionedImageDataset(tiny_images, ImageTransform(32, center_crop=True, random_flip=False), seed=0)
    reference = dataset[2]
    dataset.use_epoch(5)
    assert same_item(dataset[2], reference)


def test_sampler_is_a_permutation_per_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(50)) and len(sampler) == 50
    assert list(EpochShuffleSampler(50, seed=7)) == epoch0
    sampler.use_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(50)) and epoch1 != epoch0
    again = EpochShuffleSampler(50, seed=7)
    again.use_epoch(1)
    assert list(again) == epoch1
    assert list(EpochShuffleSampler(50, seed=8)) != epoch0


def test_collate_shapes_and_dtypes(tiny_images):
    dataset = CaptionedImageDataset(tiny_images, ImageTransform(32, center_crop=False, random_flip=True), seed=0)
    items = [dataset[i] for i in range(3)]
    batch = collate(items)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["captions"] == [item["caption"] for item in items]
    assert batch["original_sizes"].dtype == torch.long and batch["original_sizes"].shape == (3, 2)
    assert batch["crop_top_lefts"].dtype == torch.long and batch["crop_top_lefts"].shape == (3, 2)
    assert batch["original_sizes"].tolist() == [list(item["original_size"]) for item in items]
    assert batch["crop_top_lefts"].tolist() == [list(item["crop_top_left"]) for item in items]
    opened = tiny_images.open_image(0)
    assert tuple(batch["original_sizes"][0].tolist()) == (opened.height, opened.width)
