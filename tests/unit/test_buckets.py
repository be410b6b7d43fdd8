"""Aspect-ratio buckets: which buckets exist, where each image goes, batches of one bucket (also
as accelerate shards them over processes), SDXL's size/crop conditioning, and the flag errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image, ImageOps

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.data.buckets import (
    BucketBatchSampler,
    BucketPlan,
    BucketSettings,
    bucket_for,
    bucket_sizes,
    captioned_image_sizes,
    log_plan,
)
from sdft.data.dataset import CaptionedImageDataset, loader_order
from sdft.data.dreambooth import DreamBoothDataset, load_instance_images
from sdft.data.sources import DataError, load_captioned_images
from sdft.data.transforms import ImageTransform, to_tensor
from sdft.families.sdxl import StableDiffusionXL
from sdft.tiny import make_images
from tests.unit.test_cli_errors import parse_error

SMALL = BucketSettings(resolution=32, min_reso=16, max_reso=64, step=8)
MIXED = ((40, 24), (24, 40), (32, 32))   # (width, height), as make_images takes them


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("mixed") / "images", num_images=9, layout="captions", sizes=MIXED)


@pytest.fixture(scope="module")
def mixed(mixed_folder, tmp_path_factory):
    return load_captioned_images(dataset_name=None, dataset_config_name=None, train_data_dir=str(mixed_folder),
                                 image_column="image", caption_column="text",
                                 cache_dir=str(tmp_path_factory.mktemp("hf")), max_train_samples=None, seed=0)


def bucketed(images, settings=SMALL, center_crop=False, random_flip=True, seed=0) -> CaptionedImageDataset:
    plan = BucketPlan.build(captioned_image_sizes(images), settings)
    return CaptionedImageDataset(images, ImageTransform(settings.resolution, center_crop, random_flip), seed,
                                 buckets=plan)


# --------------------------------------------------------------------------- bucket sizes and assignment


def test_bucket_sizes_fill_the_area_with_step_multiples_in_range():
    sizes = bucket_sizes(SMALL)
    assert (32, 32) in sizes
    for h, w in sizes:
        assert h % 8 == 0 and w % 8 == 0 and 16 <= min(h, w) and max(h, w) <= 64
        assert h * w <= 32 * 32
        assert (w, h) in sizes, "every bucket comes in both orientations"
        # One side is as long as the other side and the area (or --max_bucket_reso) allow.
        assert (h + 8) * w > 32 * 32 or h + 8 > 64 or (w + 8) * h > 32 * 32 or w + 8 > 64
    assert sorted(sizes) == sorted({(64, 16), (56, 16), (48, 16), (40, 24), (32, 32), (24, 40), (16, 48),
                                    (16, 56), (16, 64)})


def test_kohya_defaults_at_1024():
    sizes = bucket_sizes(BucketSettings(resolution=1024))
    assert (1024, 1024) in sizes and (768, 1280) not in sizes     # 1280 > --max_bucket_reso 1024
    assert (1024, 1024) == max(sizes, key=lambda s: s[0] * s[1])
    assert all(256 <= min(s) and max(s) <= 1024 and s[0] % 64 == 0 and s[1] % 64 == 0 for s in sizes)


@pytest.mark.parametrize("size, bucket", [((24, 40), (24, 40)), ((40, 24), (40, 24)), ((50, 52), (32, 32)),
                                          ((10, 200), (16, 64)), ((300, 250), (32, 32))])
def test_each_image_goes_to_the_bucket_closest_in_aspect_ratio(size, bucket):
    assert bucket_for(size, bucket_sizes(SMALL), SMALL) == bucket


def test_no_upscale_gives_small_images_a_bucket_of_their_own():
    settings = BucketSettings(resolution=32, min_reso=16, max_reso=64, step=8, no_upscale=True)
    # 20x36 (h x w) is closest to 24x40, which would enlarge it: its own bucket is 16x32.
    assert bucket_for((20, 36), bucket_sizes(settings), settings) == (16, 32)
    assert bucket_for((48, 80), bucket_sizes(settings), settings) == (24, 40), "large images keep the standard ones"
    transform = ImageTransform(32, center_crop=True, random_flip=False)
    placement = transform.place((20, 36), None, (16, 32))
    assert placement.resized_size[0] <= 20 and placement.resized_size[1] <= 36, "an image was enlarged"


def test_a_setting_with_no_bucket_is_a_data_error():
    with pytest.raises(DataError, match="--min_bucket_reso"):
        BucketPlan.build([(32, 32)], BucketSettings(resolution=32, min_reso=64, max_reso=128, step=64))


def test_table_and_small_images_are_logged(caplog):
    plan = BucketPlan.build([(24, 40), (24, 40), (12, 40), (32, 32)], SMALL)
    with caplog.at_level(logging.INFO, logger="sdft"):
        log_plan(plan, lambda i: f"img{i}.png", SMALL)
    text = caplog.text
    assert "24 x 40" in text and "32 x 32" in text
    assert "1 training image(s) have a side below --min_bucket_reso 16" in text and "img2.png (12x40)" in text
    assert plan.counts() == {(32, 32): 1, (24, 40): 2, (16, 56): 1}


def test_image_sizes_are_read_upright_from_headers(tmp_path):
    image = Image.new("RGB", (40, 24))
    exif = image.getexif()
    exif[0x0112] = 6   # rotated 90 degrees: upright it is 24 wide and 40 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "rotated.txt").write_text("a photo")
    images = load_captioned_images(dataset_name=None, dataset_config_name=None, train_data_dir=str(tmp_path),
                                   image_column="image", caption_column="text", cache_dir=str(tmp_path / "hf"),
                                   max_train_samples=None, seed=0)
    assert captioned_image_sizes(images) == [(40, 24)]
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert ImageOps.exif_transpose(opened).size == (24, 40)


# --------------------------------------------------------------------------- batch order


def batches_of(sampler, epoch: int) -> list[list[int]]:
    sampler.use_epoch(epoch)
    return list(sampler)


def test_batches_hold_one_bucket_and_cover_every_item_once_per_epoch():
    buckets = [(24, 40)] * 5 + [(32, 32)] * 3 + [(40, 24)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=7)
    assert len(sampler) == 3 + 2 + 1
    for epoch in range(3):
        batches = batches_of(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(9))
        assert all(len({buckets[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    again = BucketBatchSampler(buckets, 2, seed=7)
    assert batches_of(sampler, 1) == batches_of(again, 1), "not a function of (seed, epoch)"
    assert batches_of(sampler, 0) != batches_of(sampler, 1), "the order must change across epochs"
    assert batches_of(sampler, 0) != batches_of(BucketBatchSampler(buckets, 2, seed=8), 0)


def test_accelerate_hands_each_process_whole_batches_of_one_bucket():
    """accelerate.prepare wraps a DataLoader's batch_sampler in BatchSamplerShard; with a
    `batch_size` attribute it would drop groups ending on a short batch."""
    buckets = [(24, 40)] * 5 + [(32, 32)] * 3 + [(40, 24)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    sampler.use_epoch(3)
    whole = list(sampler)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(BatchSamplerShard(sampler, num_processes=2)) == 3
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert all(len({buckets[i] for i in b}) == 1 for shard in shards for b in shard)


def test_loader_order_without_buckets_is_the_square_shuffle(mixed):
    dataset = CaptionedImageDataset(mixed, ImageTransform(32, False, False), seed=0)
    sampler, order = loader_order(dataset, 4, seed=0)
    assert order == {"sampler": sampler, "batch_size": 4}
    assert dataset.target_size(0) == (32, 32)


# --------------------------------------------------------------------------- items, placement, SDXL time ids


def test_items_are_cropped_to_their_bucket_and_placement_predicts_them(mixed):
    dataset = bucketed(mixed)
    dataset.use_epoch(2)
    for index in range(len(dataset)):
        item, placement = dataset[index], dataset.placement(index)
        assert tuple(item["pixel_values"].shape[1:]) == placement.target_size == dataset.target_size(index)
        assert (item["original_size"], item["crop_top_left"]) == (placement.original_size, placement.crop_top_left)
    assert {dataset.target_size(i) for i in range(len(dataset))} == {(24, 40), (40, 24), (32, 32)}
    assert dataset.placement(0, epoch=5) == bucketed(mixed).placement(0, epoch=5)


def test_sdxl_time_ids_are_each_images_original_size_crop_and_bucket(mixed, mixed_folder):
    """Every batch of a mixed-aspect folder, conditioned as the trainer does: each row of time ids
    is (original h, w; crop top, left; bucket h, w), and the crop corner is where the pixels came from."""
    dataset = bucketed(mixed, random_flip=False)
    dataset.use_epoch(1)
    sampler, order = loader_order(dataset, 2, seed=0)
    sampler.use_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=dataset.collate, **order)
    text = {"encoder_hidden_states": torch.zeros(1, 77, 8), "text_embeds": torch.zeros(1, 8)}
    seen = 0
    for batch in loader:
        cond = StableDiffusionXL().batch_condition(text, batch, torch.device("cpu"))
        time_ids = cond["added_cond_kwargs"]["time_ids"]
        for row, name, pixels in zip(time_ids.long().tolist(), batch["names"], batch["pixel_values"]):
            with Image.open(mixed_folder / name) as opened:
                image = opened.convert("RGB")
            (top, left), (bh, bw) = row[2:4], row[4:6]
            assert row[:2] == [image.height, image.width]
            assert (bh, bw) == tuple(pixels.shape[1:]) and (bh, bw) in bucket_sizes(SMALL)
            assert abs(bw / bh - image.width / image.height) < 0.35, "bucket far from the image's aspect ratio"
            scale = max(bh / image.height, bw / image.width)
            resized = image.resize((max(bw, int(image.width * scale)), max(bh, int(image.height * scale))),
                                   resample=Image.Resampling.LANCZOS)
            assert torch.equal(pixels, to_tensor(resized.crop((left, top, left + bw, top + bh))))
            seen += 1
    assert seen == len(dataset)


def test_dreambooth_prior_batches_put_class_images_in_the_instance_bucket(mixed_folder, tmp_path):
    instance = load_instance_images(instance_data_dir=str(mixed_folder), dataset_name=None, dataset_config_name=None,
                                    image_column="image", caption_column=None, instance_prompt="sks",
                                    cache_dir=None)
    class_images = [p for p in make_images(tmp_path / "class", 2, layout="images").iterdir()]
    plan = BucketPlan.build(captioned_image_sizes(instance), SMALL)
    dataset = DreamBoothDataset(instance, ImageTransform(32, False, True), 0, class_images=class_images,
                                class_prompt="dog", buckets=plan)
    sampler, order = loader_order(dataset, 2, seed=0)
    for batch in torch.utils.data.DataLoader(dataset, collate_fn=dataset.collate, **order):
        n = batch["num_instance"]
        assert batch["pixel_values"].shape[0] == 2 * n and batch["captions"][n:] == ["dog"] * n
        assert len({tuple(t) for t in batch["target_sizes"].tolist()}) == 1
        assert tuple(batch["target_sizes"][0].tolist()) == tuple(batch["pixel_values"].shape[-2:])
    with pytest.raises(DataError, match="--with_prior_preservation"):
        dataset.cache_image(("instance", 0))


# --------------------------------------------------------------------------- flags


@pytest.fixture()
def base(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    data = make_images(tmp_path / "images", num_images=2)
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--enable_bucket"]


@pytest.mark.parametrize("extra, flag", [
    (["--min_bucket_reso=1024", "--max_bucket_reso=512"], "--min_bucket_reso 1024 is larger than --max_bucket_reso"),
    (["--bucket_reso_steps=12"], "--bucket_reso_steps must be a positive multiple of 8"),
    (["--bucket_reso_steps=0"], "--bucket_reso_steps"),
    (["--min_bucket_reso=100"], "--min_bucket_reso must be a multiple of --bucket_reso_steps"),
    (["--resolution=256", "--min_bucket_reso=512"], "No bucket of about --resolution 256"),
])
def test_bad_bucket_flags_name_the_flag(base, capsys, extra, flag):
    assert flag in parse_error(base + extra, capsys)


def test_sd3_buckets_need_steps_of_16(base, capsys, tmp_path):
    argv = [base[0], f"--instance_data_dir={tmp_path / 'images'}", "--instance_prompt=sks", "--enable_bucket",
            "--bucket_reso_steps=8", "--min_bucket_reso=16", "--max_bucket_reso=64"]
    assert "--bucket_reso_steps must be a positive multiple of 16" in parse_error(argv, capsys, script=sd3_script)
    args = sd3_script.parse_args(argv[:-3] + ["--bucket_reso_steps=16", "--min_bucket_reso=16",
                                              "--max_bucket_reso=64"])
    assert args.enable_bucket and args.bucket_reso_steps == 16


def test_bucket_flags_parse_in_every_script_with_kohya_defaults(base):
    args = sdxl_script.parse_args(base)
    assert (args.enable_bucket, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
            args.bucket_no_upscale) == (True, 256, 1024, 64, False)
    assert not t2i.parse_args(base[:2]).enable_bucket


@pytest.mark.parametrize("crop_to_mask", [False, True])
def test_a_mask_is_cropped_to_the_bucket_with_its_image(crop_to_mask):
    image = Image.new("RGB", (120, 48), (0, 0, 255))
    mask = Image.new("L", (120, 48), 0)
    mask.paste(255, (90, 10, 114, 40))   # the subject sits at the right; resized, the image is 60x24
    transform = ImageTransform(32, center_crop=True, random_flip=False, crop_to_mask=crop_to_mask)
    out = transform(image, None, mask, (24, 40))
    assert tuple(out.pixels.shape) == (3, 24, 40) and tuple(out.mask.shape) == (1, 24, 40)
    placement = transform.place((48, 120), None, (24, 40), mask.resize((60, 24)))
    assert out.crop_top_left == placement.crop_top_left
    assert out.crop_top_left == ((0, 20) if crop_to_mask else (0, 10)), "the crop follows the mask only with crop_to_mask"
