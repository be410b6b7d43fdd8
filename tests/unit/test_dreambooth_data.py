"""DreamBooth data: instance and class images, prior-preservation batches, the latent cache, and
class-image generation."""

from __future__ import annotations

import logging
import re
import weakref
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image

from sdft.data.cache_store import MemoryStore
from sdft.data.dataset import EpochShuffleSampler
from sdft.data.dreambooth import (
    DreamBoothDataset,
    class_image_seed,
    generate_class_images,
    load_class_images,
    load_instance_images,
    missing_class_images,
)
from sdft.data.latent_cache import LatentCache
from sdft.data.sources import DataError
from sdft.data.transforms import ImageTransform
from sdft.tiny import make_images

PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
RANDOM = ImageTransform(32, center_crop=False, random_flip=True)
FIXED = ImageTransform(32, center_crop=True, random_flip=False)


def from_folder(folder, **overrides):
    kwargs = dict(instance_data_dir=None if folder is None else str(folder), dataset_name=None,
                  dataset_config_name=None, image_column="image", caption_column=None, instance_prompt=PROMPT,
                  cache_dir=None)
    kwargs.update(overrides)
    return load_instance_images(**kwargs)


def saved_dataset(tmp_path: Path, num_images: int = 3) -> tuple[Path, dict[str, str]]:
    """A save_to_disk folder with columns image and prompt; returns it and {file name: prompt}."""
    folder = make_images(tmp_path / "images", num_images=num_images, layout="images")
    paths = sorted(str(p) for p in folder.iterdir())
    prompts = [f"a photo of sks dog number {i}" for i in range(num_images)]
    table = datasets.Dataset.from_dict({"image": paths, "prompt": prompts}).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", {Path(p).name: c for p, c in zip(paths, prompts)}


@pytest.fixture()
def instance(tmp_path):
    return from_folder(make_images(tmp_path / "instance", num_images=3, layout="images", seed=1))


@pytest.fixture()
def class_images(tmp_path):
    return load_class_images(make_images(tmp_path / "class", num_images=5, layout="images", seed=2))


def same_item(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# --------------------------------------------------------------------------- instance images


def test_instance_folder_is_sorted_and_captioned_with_the_instance_prompt(tmp_path):
    folder = make_images(tmp_path / "instance", num_images=4, layout="images")
    images = from_folder(folder)
    assert [images.name(i) for i in range(4)] == ["image_000.png", "image_001.jpg", "image_002.png", "image_003.jpg"]
    assert all(images.captions(i) == [PROMPT] for i in range(4))
    assert images.open_image(1).size == Image.open(folder / "image_001.jpg").size


def test_non_images_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    folder = make_images(tmp_path / "instance", num_images=2, layout="images")
    (folder / "notes.txt").write_text("my dog")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" * 8)
    (folder / "nested").mkdir()
    make_images(folder / "nested", num_images=1, layout="images")   # not recursive, as upstream
    with caplog.at_level(logging.WARNING, logger="sdft.data.dreambooth"):
        images = from_folder(folder)
    assert [images.name(i) for i in range(len(images))] == ["image_000.png", "image_001.jpg"]
    message = caplog.text
    assert "notes.txt" in message and ".DS_Store" in message and "nested" in message
    assert "--instance_data_dir" in message


@pytest.mark.parametrize("kind", ["instance", "class"])
def test_corrupt_image_is_a_data_error_naming_the_file(tmp_path, kind):
    folder = make_images(tmp_path / kind, num_images=3, layout="images")
    corrupt = folder / "image_001.jpg"
    corrupt.write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(DataError) as exc:
        from_folder(folder) if kind == "instance" else load_class_images(folder)
    assert str(corrupt) in str(exc.value)


@pytest.mark.parametrize("state", ["empty", "only-notes", "missing"])
def test_folder_without_images_is_a_data_error_naming_the_flag(tmp_path, state):
    folder = tmp_path / "instance"
    if state != "missing":
        folder.mkdir()
    if state == "only-notes":
        (folder / "notes.txt").write_text("my dog")
    with pytest.raises(DataError) as exc:
        from_folder(folder)
    assert "--instance_data_dir" in str(exc.value) and str(folder) in str(exc.value)


@pytest.mark.parametrize("both", [True, False])
def test_exactly_one_instance_source(tmp_path, both):
    with pytest.raises(DataError, match="exactly one of --instance_data_dir and --dataset_name"):
        from_folder(tmp_path if both else None, dataset_name=str(tmp_path) if both else None)


@pytest.mark.parametrize("caption_column", [None, "prompt"])
def test_dataset_name_captions(tmp_path, caption_column):
    saved, prompts = saved_dataset(tmp_path)
    images = from_folder(None, dataset_name=str(saved), caption_column=caption_column)
    assert len(images) == 3
    for i in range(3):
        expected = prompts[images.name(i)] if caption_column else PROMPT
        assert images.captions(i) == [expected]
        assert images.open_image(i).size[0] > 0


@pytest.mark.parametrize("flag, overrides", [("--caption_column", {"caption_column": "text"}),
                                             ("--image_column", {"image_column": "picture"})])
def test_unknown_dataset_column_names_the_flag_and_the_columns(tmp_path, flag, overrides):
    saved, _ = saved_dataset(tmp_path, num_images=1)
    with pytest.raises(DataError) as exc:
        from_folder(None, dataset_name=str(saved), **overrides)
    message = str(exc.value)
    assert flag in message and "image, prompt" in message.split("columns are:")[1]


# --------------------------------------------------------------------------- dataset


def test_repeats_repeat_every_image_and_its_caption(tmp_path):
    saved, prompts = saved_dataset(tmp_path)
    images = from_folder(None, dataset_name=str(saved), caption_column="prompt")
    dataset = DreamBoothDataset(images, FIXED, seed=0, repeats=3)
    assert len(dataset) == 9
    for index in range(9):
        item = dataset[index]
        assert item["name"] == images.name(index % 3)
        assert item["caption"] == prompts[item["name"]]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert "class_pixel_values" not in item
    assert same_item(dataset[1], dataset[4]), "without augmentation a repeat is the same example"


@pytest.mark.parametrize("repeats, length", [(1, 5), (2, 6)])
def test_prior_preservation_items_pair_instance_and_class_images(instance, class_images, repeats, length):
    dataset = DreamBoothDataset(instance, RANDOM, seed=0, repeats=repeats, class_images=class_images,
                                class_prompt=CLASS_PROMPT)
    assert len(dataset) == length   # max(3 * repeats, 5 class images)
    for index in range(length):
        item = dataset[index]
        assert item["name"] == instance.name(index % 3) and item["caption"] == PROMPT
        assert item["class_name"] == class_images[index % 5].name and item["class_caption"] == CLASS_PROMPT
        assert item["class_pixel_values"].shape == (3, 32, 32)
        with Image.open(class_images[index % 5]) as image:
            assert item["class_original_size"] == (image.height, image.width)


def test_collate_puts_the_instance_half_first(instance, class_images):
    dataset = DreamBoothDataset(instance, RANDOM, seed=0, class_images=class_images, class_prompt=CLASS_PROMPT)
    items = [dataset[0], dataset[1]]
    batch = DreamBoothDataset.collate(items)
    assert batch["num_instance"] == 2
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    expected = [items[0]["pixel_values"], items[1]["pixel_values"],
                items[0]["class_pixel_values"], items[1]["class_pixel_values"]]
    assert all(torch.equal(batch["pixel_values"][k], expected[k]) for k in range(4))
    assert batch["captions"] == [PROMPT, PROMPT, CLASS_PROMPT, CLASS_PROMPT]
    assert batch["names"] == [instance.name(0), instance.name(1), class_images[0].name, class_images[1].name]
    assert batch["original_sizes"].shape == (4, 2) and batch["original_sizes"].dtype == torch.long
    assert batch["crop_top_lefts"][2].tolist() == list(items[0]["class_crop_top_left"])


def test_collate_without_class_images(instance):
    dataset = DreamBoothDataset(instance, RANDOM, seed=0)
    batch = DreamBoothDataset.collate([dataset[2], dataset[0]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["num_instance"] == 2
    assert batch["names"] == [instance.name(2), instance.name(0)] and batch["captions"] == [PROMPT, PROMPT]


def test_items_are_a_function_of_seed_epoch_and_index(instance, class_images):
    first, second = (DreamBoothDataset(instance, RANDOM, seed=4, class_images=class_images, class_prompt=CLASS_PROMPT)
                     for _ in range(2))
    first.use_epoch(3)
    second.use_epoch(3)
    assert all(same_item(first[i], second[i]) for i in (4, 0, 4))
    for key in ("pixel_values", "class_pixel_values"):
        seen = set()
        for epoch in range(6):
            first.use_epoch(epoch)
            item = first[1]
            seen.add((item[key.replace("pixel_values", "crop_top_left")], item[key].sum().item()))
        assert len(seen) > 1, f"{key} never changed over 6 epochs with random crop and flip"


def test_distinct_captions_include_the_class_prompt(tmp_path, instance, class_images):
    with_prior = DreamBoothDataset(instance, FIXED, seed=0, class_images=class_images, class_prompt=CLASS_PROMPT)
    assert with_prior.distinct_captions(2) == {PROMPT, CLASS_PROMPT}
    assert with_prior.distinct_captions(1) is None
    assert DreamBoothDataset(instance, FIXED, seed=0).distinct_captions(1) == {PROMPT}
    saved, prompts = saved_dataset(tmp_path)
    captioned = from_folder(None, dataset_name=str(saved), caption_column="prompt")
    assert DreamBoothDataset(captioned, FIXED, seed=0).distinct_captions(3) == set(prompts.values())
    assert DreamBoothDataset(captioned, FIXED, seed=0).distinct_captions(2) is None


def test_bad_dataset_arguments(instance, class_images):
    with pytest.raises(DataError, match="--repeats"):
        DreamBoothDataset(instance, FIXED, seed=0, repeats=0)
    with pytest.raises(DataError, match="--class_data_dir"):
        DreamBoothDataset(instance, FIXED, seed=0, class_images=[], class_prompt=CLASS_PROMPT)
    with pytest.raises(DataError, match="--class_prompt"):
        DreamBoothDataset(instance, FIXED, seed=0, class_images=class_images)


# --------------------------------------------------------------------------- latent cache


def fill_cache(dataset: DreamBoothDataset) -> tuple[dict, dict]:
    """A distinct tensor per cached image (+0.5 for its mirror image), stored as the latent cache
    stores entries; also each key's plans."""
    codes = {key: float(key[1] + (100 if key[0] == "class" else 0)) for key in dataset.cache_keys()}
    store, names, plans = MemoryStore(), {}, {}
    for key in dataset.cache_keys():
        plans[key] = dataset.cache_image(key).plans
        names[key] = tuple(f"{key}-{plan.flip}" for plan in plans[key])
        for name, plan in zip(names[key], plans[key]):
            assert dataset.cache_pixels(key, plan).pixels.shape == (3, 32, 32)
            store.write(name, {"moments": torch.full((8, 4, 4), codes[key] + 0.5 * plan.flip),
                               "original_size": torch.tensor(plan.original_size),
                               "crop_top_left": torch.tensor(plan.crop_top_left),
                               "target_size": torch.tensor(plan.target_size)})
    dataset.latent_cache = LatentCache(store, names)
    return codes, plans


def test_cached_latents_follow_their_images_under_shuffling(tmp_path, class_images):
    saved, prompts = saved_dataset(tmp_path)
    images = from_folder(None, dataset_name=str(saved), caption_column="prompt")
    dataset = DreamBoothDataset(images, RANDOM, seed=0, class_images=class_images, class_prompt=CLASS_PROMPT)
    codes, plans = fill_cache(dataset)
    instance_key = {images.name(i): ("instance", i) for i in range(len(images))}
    class_key = {path.name: ("class", j) for j, path in enumerate(class_images)}
    for path in [*class_images, *(tmp_path / "images").iterdir()]:
        path.unlink()   # items must not open an image once latents are cached
    sampler = EpochShuffleSampler(len(dataset), seed=0)
    flips = set()
    for epoch in range(3):
        sampler.use_epoch(epoch)
        dataset.use_epoch(epoch)
        for index in sampler:
            item = dataset[index]
            assert "pixel_values" not in item and "class_pixel_values" not in item
            for prefix, keys in (("", instance_key), ("class_", class_key)):
                key = keys[item[prefix + "name"]]
                flip = bool(item[prefix + "latent_moments"][0, 0, 0] - codes[key])
                flips.add(flip)
                assert torch.equal(item[prefix + "latent_moments"], torch.full((8, 4, 4), codes[key] + 0.5 * flip))
                assert item[prefix + "original_size"] == plans[key][flip].original_size
                assert item[prefix + "crop_top_left"] == plans[key][flip].crop_top_left
                assert item[prefix + "target_size"] == (32, 32)
            assert item["caption"] == prompts[item["name"]]
    assert flips == {False, True}, "with --random_flip the cached mirror image must be drawn too"


def test_collate_with_cached_latents(instance, class_images):
    dataset = DreamBoothDataset(instance, FIXED, seed=0, class_images=class_images, class_prompt=CLASS_PROMPT)
    codes, _ = fill_cache(dataset)
    batch = DreamBoothDataset.collate([dataset[4], dataset[2]])
    assert "pixel_values" not in batch and batch["num_instance"] == 2
    assert batch["latent_moments"].shape == (4, 8, 4, 4)
    wanted = [codes[("instance", 1)], codes[("instance", 2)], codes[("class", 4)], codes[("class", 2)]]
    assert batch["latent_moments"][:, 0, 0, 0].tolist() == wanted
    assert batch["captions"] == [PROMPT, PROMPT, CLASS_PROMPT, CLASS_PROMPT]
    assert batch["target_sizes"].tolist() == [[32, 32]] * 4


def test_cache_plans_are_fixed_per_image_and_flip_only(instance):
    dataset = DreamBoothDataset(instance, RANDOM, seed=0)
    first = {key: dataset.cache_image(key) for key in dataset.cache_keys()}
    dataset.use_epoch(7)
    again = {key: dataset.cache_image(key) for key in dataset.cache_keys()}
    assert first.keys() == {("instance", 0), ("instance", 1), ("instance", 2)}
    assert first == again
    for image in first.values():
        plain, mirrored = image.plans
        assert (plain.flip, mirrored.flip) == (False, True)
        (top, left), width = plain.crop_top_left, plain.resized_size[1]
        assert mirrored.crop_top_left == (top, width - left - 32), "the same region, mirrored"
    assert all(len(DreamBoothDataset(instance, FIXED, seed=0).cache_image(key).plans) == 1 for key in first)


def test_missing_latent_is_a_clear_error(instance):
    dataset = DreamBoothDataset(instance, FIXED, seed=0)
    dataset.latent_cache = LatentCache(MemoryStore(), {})
    with pytest.raises(RuntimeError, match="cache_keys"):
        dataset[0]


# --------------------------------------------------------------------------- class images


def test_missing_class_images_counts_and_creates_the_folder(tmp_path):
    folder = tmp_path / "new" / "class"
    assert missing_class_images(folder, 4) == 4 and folder.is_dir()
    make_images(folder, num_images=3, layout="images")
    (folder / "notes.txt").write_text("not an image")
    assert missing_class_images(folder, 4) == 1
    assert missing_class_images(folder, 3) == 0
    assert missing_class_images(folder, 2) == 0


def colour(seed: int) -> tuple[int, int, int]:
    return (seed % 200 + 20, (seed >> 8) % 200 + 20, (seed >> 16) % 200 + 20)


class FakePipeline:
    """Stands in for a diffusers text-to-image pipeline: one solid image per generator, its colour
    derived from the generator's seed."""

    device = torch.device("cpu")

    def __init__(self):
        self.batches: list[list[str]] = []
        self.progress_bar_config: dict = {}

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    def __call__(self, prompt, generator, num_inference_steps=28):
        assert isinstance(prompt, list) and isinstance(generator, list) and len(prompt) == len(generator)
        self.batches.append(prompt)
        return SimpleNamespace(images=[Image.new("RGB", (16, 16), colour(g.initial_seed())) for g in generator])


class Factory:
    def __init__(self):
        self.calls = 0
        self.made: list[weakref.ref] = []
        self.last_batches: list[list[str]] = []

    def __call__(self) -> FakePipeline:
        self.calls += 1
        pipeline = FakePipeline()
        self.made.append(weakref.ref(pipeline))
        self.last_batches = pipeline.batches
        return pipeline


def test_generate_class_images(tmp_path, accelerator):
    folder = tmp_path / "class"
    assert missing_class_images(folder, 7) == 7
    factory = Factory()
    generate_class_images(folder, CLASS_PROMPT, 5, factory, sample_batch_size=2, accelerator=accelerator,
                          seed=3, start_index=2)
    assert factory.calls == 1
    assert factory.last_batches == [[CLASS_PROMPT] * 2, [CLASS_PROMPT] * 2, [CLASS_PROMPT]]
    assert factory.made[0]() is None, "the pipeline must be released after generation"
    files = load_class_images(folder)
    assert len(files) == 5 and missing_class_images(folder, 7) == 2
    by_index = {int(p.name.split("-")[0]): p for p in files}
    assert sorted(by_index) == [2, 3, 4, 5, 6]
    for index, path in by_index.items():
        assert re.fullmatch(rf"{index}-[0-9a-f]{{16}}\.jpg", path.name)
        with Image.open(path) as image:
            assert image.format == "JPEG"
            pixel = image.convert("RGB").getpixel((8, 8))
        expected = colour(class_image_seed(3, index))
        assert all(abs(a - b) <= 3 for a, b in zip(pixel, expected)), (pixel, expected)


def test_generated_images_do_not_depend_on_the_batch_size(tmp_path, accelerator):
    names = []
    for batch_size in (1, 3):
        folder = tmp_path / f"batch-{batch_size}"
        generate_class_images(folder, CLASS_PROMPT, 4, Factory(), sample_batch_size=batch_size,
                              accelerator=accelerator, seed=0, start_index=0)
        names.append(sorted(p.name for p in folder.iterdir()))
    assert names[0] == names[1] and len(set(n.split("-")[1] for n in names[0])) == 4


def test_no_pipeline_is_built_when_nothing_is_missing(tmp_path, accelerator):
    factory = Factory()
    generate_class_images(tmp_path, CLASS_PROMPT, 0, factory, sample_batch_size=4, accelerator=accelerator,
                          seed=0, start_index=5)
    assert factory.calls == 0 and list(tmp_path.iterdir()) == []
