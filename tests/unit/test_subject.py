"""Subject data: caption.csv, masks through the transform, the masked loss in closed form, and the
preprocessing models (tiny BLIP, Swin2SR, CLIPSeg built offline)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdft.data.cache_store import MemoryStore
from sdft.data.dreambooth import DreamBoothDataset, load_instance_images
from sdft.data.latent_cache import LatentCache
from sdft.data.preprocess.subject import CAPTIONS_FILE, SubjectPlan, image_size, prepare_subject
from sdft.data.sources import DataError, load_captioned_images
from sdft.data.transforms import ImageTransform
from sdft.objectives import DDPMObjective, Noised, latent_mask, masked_per_sample_mse
from sdft.tiny import build_blip, build_clipseg, build_swin2sr, make_images


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The tiny models are latency-bound; extra threads only contend on a shared machine."""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("helpers")
    return {"blip": build_blip(root / "blip"), "swin2sr": build_swin2sr(root / "swin2sr"),
            "clipseg": build_clipseg(root / "clipseg")}


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_file", "caption"])
        writer.writerows(rows)


def load_folder(folder: Path, allow_missing: bool = False):
    return load_captioned_images(dataset_name=None, dataset_config_name=None, train_data_dir=str(folder),
                                 image_column="image", caption_column="text", cache_dir=None,
                                 max_train_samples=None, seed=0, allow_missing_captions=allow_missing)


# --------------------------------------------------------------------------- caption.csv


def test_caption_csv_captions_a_nested_folder_by_path_or_file_name(tmp_path):
    data = make_images(tmp_path / "data", num_images=3, layout="images")
    (data / "sub").mkdir()
    (data / "image_002.png").rename(data / "sub" / "image_002.png")
    write_csv(data / "my_captions.csv", [("image_000.png", "first"), ("image_001.jpg", "second"),
                                         ("image_002.png", "third, found by name")])
    images = load_folder(data)
    assert {Path(images.describe(i).split(" ")[0]).name: images.captions(i)[0] for i in range(3)} == {
        "image_000.png": "first", "image_001.jpg": "second", "image_002.png": "third, found by name"}


@pytest.mark.parametrize("rows, message", [
    ([("image_000.png", "ok"), ("missing.png", "a caption")], r"row 2 names the image 'missing.png'"),
    ([("image_000.png", "ok"), ("image_001.jpg", "  ")], r"row 2 \('image_001.jpg'\) has no caption"),
])
def test_bad_caption_csv_rows_are_named(tmp_path, rows, message):
    data = make_images(tmp_path / "data", num_images=2, layout="images")
    write_csv(data / "caption.csv", rows)
    with pytest.raises(DataError, match=message):
        load_folder(data)


def test_images_without_captions_are_named_unless_a_captioner_fills_them(tmp_path):
    data = make_images(tmp_path / "data", num_images=2, layout="images")
    write_csv(data / "caption.csv", [("image_000.png", "ok")])
    with pytest.raises(DataError, match="image_001.jpg"):
        load_folder(data)
    assert load_folder(data, allow_missing=True).caption_column_values == ["ok", None]


def test_sd3_instance_folder_takes_caption_csv_captions_and_the_instance_prompt_for_the_rest(tmp_path):
    data = make_images(tmp_path / "data", num_images=2, layout="images")
    write_csv(data / "caption.csv", [("image_001.jpg", "its own caption")])
    images = load_instance_images(instance_data_dir=str(data), dataset_name=None, dataset_config_name=None,
                                  image_column="image", caption_column=None, instance_prompt="sks",
                                  cache_dir=None)
    assert images.caption_column_values == ["sks", "its own caption"]


# --------------------------------------------------------------------------- masks through the transform


def striped(size=(64, 48)) -> Image.Image:
    """An image whose red channel is a horizontal ramp plus a block: any flip or shift shows."""
    image = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), ((x * 4) % 256, 255 if x < 20 and y < 30 else 0, 0))
    return image


@pytest.mark.parametrize("seed", range(6))
def test_mask_follows_resize_flip_and_crop(seed):
    image = striped()
    mask = image.getchannel("R")       # the mask is the image's red channel, so they must agree
    transform = ImageTransform(32, center_crop=False, random_flip=True, interpolation="bilinear")
    out = transform(image, random.Random(seed), mask)
    red = (out.pixels[0] + 1) / 2
    assert out.mask.shape == (1, 32, 32)
    assert torch.allclose(out.mask[0], red, atol=1.5 / 255)
    plain = transform(image, random.Random(seed))
    assert torch.equal(plain.pixels, out.pixels) and plain.crop_top_left == out.crop_top_left
    assert plain.mask is None


def test_crop_to_mask_centres_the_crop_on_the_subject():
    image = Image.new("RGB", (96, 32))
    mask = Image.new("L", (96, 32))
    mask.paste(255, (60, 0, 76, 32))   # the subject's centre is x = 67.5
    out = ImageTransform(32, center_crop=True, random_flip=False, crop_to_mask=True)(image, random.Random(0), mask)
    assert out.crop_top_left == (0, 52)
    edge = Image.new("L", (96, 32))
    edge.paste(255, (90, 0, 96, 32))   # near the edge: clamped inside the image
    out = ImageTransform(32, center_crop=True, random_flip=False, crop_to_mask=True)(image, random.Random(0), edge)
    assert out.crop_top_left == (0, 64)


def test_dreambooth_class_half_is_unmasked(tmp_path):
    from sdft.data.sources import CaptionedImages

    data = make_images(tmp_path / "inst", num_images=2, layout="images")
    classes = make_images(tmp_path / "class", num_images=2, layout="images")
    instance = load_instance_images(instance_data_dir=str(data), dataset_name=None, dataset_config_name=None,
                                    image_column="image", caption_column=None, instance_prompt="sks",
                                    cache_dir=None)
    masked = CaptionedImages(instance.table, "image", "prompt", alpha_mask=True)   # JPEG/PNG without alpha
    dataset = DreamBoothDataset(masked, ImageTransform(32, True, False), seed=0,
                                class_images=sorted(classes.iterdir()), class_prompt="a photo")
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["masks"].shape == (4, 1, 32, 32) and torch.equal(batch["masks"], torch.ones(4, 1, 32, 32))
    store, names = MemoryStore(), {}
    for key in dataset.cache_keys():
        names[key] = (str(key),)
        store.write(str(key), {"moments": torch.zeros(8, 4, 4), "original_size": torch.tensor([32, 32]),
                               "crop_top_left": torch.tensor([0, 0]), "target_size": torch.tensor([32, 32]),
                               **({"mask": torch.zeros(1, 32, 32)} if key == ("instance", 0) else {})})
    dataset.latent_cache = LatentCache(store, names)
    batch = dataset.collate([dataset[0]])
    assert batch["masks"][0].sum() == 0 and batch["masks"][1].min() == 1, "cached mask for instance, ones for class"


# --------------------------------------------------------------------------- masked loss in closed form


def ddpm_loss(pred, target, mask=None):
    objective = DDPMObjective(alphas_cumprod=torch.linspace(0.99, 0.01, 10), prediction_type="epsilon")
    noised = Noised(noisy=pred, timesteps=torch.zeros(pred.shape[0], dtype=torch.long), target=target,
                    weighting=torch.ones(pred.shape[0]))
    return objective.loss(pred, noised, mask)


def test_all_ones_mask_gives_exactly_the_unmasked_loss_and_gradient():
    torch.manual_seed(0)
    target = torch.randn(3, 4, 8, 8)
    pred_a = torch.randn(3, 4, 8, 8, requires_grad=True)
    pred_b = pred_a.detach().clone().requires_grad_(True)
    plain = ddpm_loss(pred_a, target)
    masked = ddpm_loss(pred_b, target, latent_mask(torch.ones(3, 1, 64, 64), (8, 8)))
    assert torch.equal(plain, masked)
    plain.mean().backward()
    masked.mean().backward()
    assert torch.equal(pred_a.grad, pred_b.grad)


def test_half_mask_is_the_masked_mean_computed_by_hand():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    pixels = torch.zeros(2, 1, 32, 32)
    pixels[0, :, :, :16] = 1          # sample 0: left half
    pixels[1, :, 16:, :] = 1          # sample 1: bottom half
    mask = latent_mask(pixels, (4, 4))
    squared = (pred - target) ** 2
    by_hand = torch.stack([squared[0, :, :, :2].mean(), squared[1, :, 2:, :].mean()])
    assert torch.allclose(ddpm_loss(pred, target, mask), by_hand, rtol=1e-6)
    # The scale does not depend on the area: a quarter mask of equal errors gives the same loss.
    ones = torch.ones(1, 4, 4, 4)
    quarter = torch.zeros(1, 1, 4, 4)
    quarter[..., :2, :2] = 1
    assert torch.allclose(masked_per_sample_mse(ones, quarter), masked_per_sample_mse(ones, torch.ones(1, 1, 4, 4)))


def test_latent_mask_is_a_box_average_and_an_empty_mask_gives_no_gradient():
    pixels = torch.zeros(1, 1, 16, 16)
    pixels[..., :8, :4] = 1           # half of latent pixel (0, 0) at a factor of 8
    assert torch.equal(latent_mask(pixels, (2, 2)), torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]]))
    pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    loss = ddpm_loss(pred, torch.randn(2, 4, 2, 2), torch.zeros(2, 1, 2, 2))
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="latent grid"):
        masked_per_sample_mse(torch.ones(1, 4, 4, 4), torch.ones(1, 1, 8, 8))


# --------------------------------------------------------------------------- preprocessing models


def sized_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"p{i}.png")
    return folder


def test_caption_model_with_prefix_writes_captions_csv_with_every_image(tmp_path, helpers, accelerator):
    data = sized_folder(tmp_path / "data", [(40, 40), (48, 36), (36, 52)])
    write_csv(data / "caption.csv", [("p1.png", "given by the user")])
    plan = SubjectPlan(resolution=32, output_dir=tmp_path / "out", root=data, caption_model=str(helpers["blip"]),
                       caption_prefix="a photo of TOK, ")
    images = prepare_subject(load_folder(data, allow_missing=True), plan, accelerator)
    with open(tmp_path / "out" / CAPTIONS_FILE, newline="") as handle:
        rows = {row["image_file"]: row["caption"] for row in csv.DictReader(handle)}
    assert set(rows) == {"p0.png", "p1.png", "p2.png"}
    assert rows["p1.png"] == "given by the user"
    for name in ("p0.png", "p2.png"):
        assert rows[name].startswith("a photo of TOK, ") and len(rows[name]) > len("a photo of TOK, ")
    assert [images.captions(i)[0] for i in range(3)] == [rows["p0.png"], rows["p1.png"], rows["p2.png"]]


def test_upscale_model_changes_exactly_the_small_images_and_caches_them(tmp_path, helpers, accelerator, caplog):
    sizes = [(40, 40), (20, 28), (64, 30), (33, 32)]   # shorter side vs resolution 32: ok, small, small, ok
    data = sized_folder(tmp_path / "data", sizes)
    for i in range(len(sizes)):
        (data / f"p{i}.txt").write_text(f"caption {i}")
    plan = SubjectPlan(resolution=32, output_dir=tmp_path / "out", root=data, upscale_model=str(helpers["swin2sr"]))
    images = prepare_subject(load_folder(data), plan, accelerator)
    assert [image_size(images, i) for i in range(4)] == [(40, 40), (40, 56), (128, 60), (33, 32)]
    assert [Path(images.describe(i).split(" ")[0]).parent == data for i in range(4)] == [True, False, False, True]
    with caplog.at_level("INFO"):
        again = prepare_subject(load_folder(data), plan, accelerator)
    assert "(2 cached)" in caplog.text and again.table["image"] == images.table["image"]
    caplog.clear()
    prepare_subject(load_folder(data), SubjectPlan(resolution=32, output_dir=tmp_path / "o2", root=data), accelerator)
    assert "2 of 4 images are smaller than --resolution 32" in caplog.text


def test_masks_from_files_then_clipseg_saved_beside_captions_csv(tmp_path, helpers, accelerator):
    data = sized_folder(tmp_path / "data", [(40, 40), (48, 36)])
    for i in range(2):
        (data / f"p{i}.txt").write_text("x")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (40, 40), 255).save(masks / "p0.png")
    plan = SubjectPlan(resolution=32, output_dir=tmp_path / "out", root=data, mask_data_dir=str(masks),
                       mask_model=str(helpers["clipseg"]), mask_target_prompts=("a face",), need_masks=True)
    images = prepare_subject(load_folder(data), plan, accelerator)
    assert images.table[images.mask_column] == [str(masks / "p0.png"), str(tmp_path / "out" / "masks" / "p1.png")]
    generated = Image.open(tmp_path / "out" / "masks" / "p1.png")
    assert generated.mode == "L" and generated.size == (48, 36)
    image = images.open_image(1)
    assert images.open_mask(1, image).size == image.size
    without_model = SubjectPlan(resolution=32, output_dir=tmp_path / "o2", root=data, mask_data_dir=str(masks),
                                need_masks=True)
    with pytest.raises(DataError, match="p1.png"):
        prepare_subject(load_folder(data), without_model, accelerator)


def test_upscaled_images_of_an_image_folder_with_metadata_stay_undecoded_images(tmp_path, helpers, accelerator):
    data = make_images(tmp_path / "data", num_images=3, layout="metadata")   # datasets' Image feature
    images = load_folder(data)
    before = [image_size(images, i) for i in range(3)]
    plan = SubjectPlan(resolution=64, output_dir=tmp_path / "out", root=data, upscale_model=str(helpers["swin2sr"]))
    after = prepare_subject(images, plan, accelerator)
    assert [image_size(after, i) for i in range(3)] == [
        (w * 2, h * 2) if min(w, h) < 64 else (w, h) for w, h in before]
    assert after.open_image(0).size == image_size(after, 0) and after.captions(0) == images.captions(0)
