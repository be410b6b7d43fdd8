"""A subject from a zip, end to end in each script (in-process runs of the real entry points, one
optimizer step at resolution 32): the archive is extracted, its caption.csv supplies the captions,
and the masked loss behaves as its closed form says it must on real training."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.tiny import build_blip, build_clipseg, build_sd3, build_sdxl, build_swin2sr, make_images
from tests.integration.conftest import sd_args
from tests.subject_fixtures import PHOTOS, photo_zip

pytestmark = pytest.mark.integration
CSV_CAPTIONS = {Path(name).name: f"a photo of sks {i}" for i, (name, _) in enumerate(PHOTOS)}


@pytest.fixture(autouse=True)
def _quiet(fresh_accelerate_state, one_thread, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_zip(tmp_path_factory.mktemp("zip") / "photos.zip")


class DataSpy:
    """Wraps a script's data builder to keep the dataset it built (the run is otherwise untouched)."""

    def __init__(self, monkeypatch, module, name: str):
        self.build, self.dataset = getattr(module, name), None
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args):
        self.dataset = self.build(*args)
        return self.dataset

    def captions(self, images) -> dict[str, str]:
        return {images.name(i): images.captions(i)[0] for i in range(len(images))}


def train(script, argv) -> None:
    assert run(script.main, script.parse_args([str(a) for a in argv])) == 0


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def mask_folder(folder: Path, value: int) -> Path:
    folder.mkdir()
    for name, size in PHOTOS:
        Image.new("L", size, value).save(folder / (Path(name).stem + ".png"))
    return folder


def test_sd1_zip_trains_on_the_csv_captions_and_masks_weight_the_loss(tiny_sd, photos, tmp_path, monkeypatch):
    common = ["--max_train_steps", "1", "--train_batch_size", "4", "--adam_weight_decay", "0", "--report_to", "none",
              "--random_flip"]
    spy = DataSpy(monkeypatch, t2i, "text_image_data")
    train(t2i, sd_args(tiny_sd, photos, tmp_path / "plain", *common))
    assert spy.captions(spy.dataset.images) == CSV_CAPTIONS
    plain = unet_weights(tmp_path / "plain")
    base = unet_weights(tiny_sd)
    assert any(not torch.equal(plain[k], base[k]) for k in base), "one step must change the UNet"

    # All-ones masks: bit for bit the run without masks.
    ones = mask_folder(tmp_path / "ones", 255)
    train(t2i, sd_args(tiny_sd, photos, tmp_path / "ones-out", *common, "--masked_loss", "--mask_data_dir", ones))
    masked = unet_weights(tmp_path / "ones-out")
    assert all(torch.equal(plain[k], masked[k]) for k in plain)

    # All-zero masks and no weight decay: no gradient, so the trained UNet is the base UNet.
    zeros = mask_folder(tmp_path / "zeros", 0)
    train(t2i, sd_args(tiny_sd, photos, tmp_path / "zeros-out", *common, "--masked_loss", "--mask_data_dir", zeros))
    untouched = unet_weights(tmp_path / "zeros-out")
    assert all(torch.equal(base[k], untouched[k]) for k in base)

    # The same zip as DreamBooth instance data: the CSV captions win over --instance_prompt.
    dreambooth = DataSpy(monkeypatch, t2i, "dreambooth_data")
    train(t2i, ["--pretrained_model_name_or_path", tiny_sd, "--instance_data_dir", photos, "--instance_prompt", "sks",
                "--output_dir", tmp_path / "db", "--resolution", "32", "--seed", "0", *common, "--use_lora"])
    assert dreambooth.captions(dreambooth.dataset.instance) == CSV_CAPTIONS


def test_sdxl_lora_from_a_zip_with_auto_captions_upscaling_and_face_masks(photos, tmp_path, monkeypatch):
    """The README's command, on tiny models."""
    from diffusers import StableDiffusionXLPipeline

    model = build_sdxl(tmp_path / "sdxl")
    blip, swin, clipseg = build_blip(tmp_path / "blip"), build_swin2sr(tmp_path / "swin"), build_clipseg(tmp_path / "cs")
    partial = photo_zip(tmp_path / "partial.zip", captions={"one.png": "a photo of TOK smiling"})
    out = tmp_path / "out"
    spy = DataSpy(monkeypatch, sdxl_script, "text_image_data")
    train(sdxl_script, sd_args(
        model, partial, out, "--max_train_steps", "1", "--use_lora", "--rank", "4", "--report_to", "none",
        "--caption_model", blip, "--caption_prefix", "a photo of TOK, ", "--upscale_model", swin,
        "--mask_model", clipseg, "--mask_target_prompts", "a face", "--masked_loss", "--crop_to_mask"))

    with open(out / "captions.csv", newline="") as handle:
        rows = {row["image_file"]: row["caption"] for row in csv.DictReader(handle)}
    assert set(rows) == {name for name, _ in PHOTOS}
    assert rows["photos/one.png"] == "a photo of TOK smiling"
    assert all(caption.startswith("a photo of TOK, ") for name, caption in rows.items() if name != "photos/one.png")
    assert sorted(spy.captions(spy.dataset.images).values()) == sorted(rows.values())
    assert {p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")} == {
        str(Path(name).with_suffix(".png").as_posix()) for name, _ in PHOTOS}
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(out)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_sd3_instance_zip_with_csv_captions_class_tar_and_cached_masked_latents(photos, tmp_path, monkeypatch):
    model = build_sd3(tmp_path / "sd3")
    classes = make_images(tmp_path / "dogs", num_images=2, layout="images")
    class_tar = tmp_path / "dogs.tar.gz"
    with tarfile.open(class_tar, "w:gz") as handle:
        handle.add(classes, arcname="nested/dogs")
    spy = DataSpy(monkeypatch, sd3_script, "dreambooth_data")
    train(sd3_script, [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", photos, "--output_dir", tmp_path / "out",
        "--instance_prompt", "unused: the CSV captions every photo", "--resolution", "32", "--train_batch_size", "2",
        "--max_train_steps", "1", "--seed", "0", "--max_sequence_length", "16", "--report_to", "none",
        "--with_prior_preservation", "--class_data_dir", class_tar, "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--masked_loss", "--alpha_mask", "--cache_latents", "--use_lora"])
    dataset = spy.dataset
    assert spy.captions(dataset.instance) == CSV_CAPTIONS
    assert len(dataset.class_images) == 2 and all("nested/dogs" in str(p) for p in dataset.class_images)
    cache = dataset.latent_cache
    masked = {key for key, names in cache.names.items() if "mask" in cache.store.read(names[0], str(key))}
    assert masked == {("instance", i) for i in range(len(PHOTOS))}, "instance latents carry their masks"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_a_refused_archive_stops_the_script_naming_the_member(tiny_sd, tmp_path, capsys):
    import zipfile

    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("ok.png", b"")
        handle.writestr("../../outside.png", b"")
    out = tmp_path / "work" / "out"
    code = run(t2i.main, t2i.parse_args([str(a) for a in sd_args(tiny_sd, archive, out)]))
    assert code == 1 and "'../../outside.png'" in capsys.readouterr().err
    assert not (tmp_path / "outside.png").exists() and not (tmp_path / "work" / "outside.png").exists()
    assert not list(out.rglob("*.png"))


def test_two_processes_share_captioning_and_masking(tiny_sd, photos, tmp_path):
    """Each process captions and masks its share; every caption reaches captions.csv and training
    on both processes (the replica check at the end) sees the same captions."""
    from tests.integration.conftest import accelerate_launch

    blip, clipseg = build_blip(tmp_path / "blip"), build_clipseg(tmp_path / "cs")
    partial = photo_zip(tmp_path / "partial.zip", captions={"three.jpg": "given"})
    out = tmp_path / "out"
    result = accelerate_launch("train_text_to_image.py", sd_args(
        tiny_sd, partial, out, "--max_train_steps", "1", "--use_lora", "--report_to", "none",
        "--caption_model", blip, "--caption_prefix", "TOK, ", "--mask_model", clipseg,
        "--mask_target_prompts", "a face", "--masked_loss"), num_processes=2)
    assert "identical on all 2 processes" in result.stderr + result.stdout
    with open(out / "captions.csv", newline="") as handle:
        rows = {row["image_file"]: row["caption"] for row in csv.DictReader(handle)}
    assert set(rows) == {name for name, _ in PHOTOS} and rows["three.jpg"] == "given"
    assert all(caption.startswith("TOK, ") for name, caption in rows.items() if name != "three.jpg")
    assert len(list((out / "masks").rglob("*.png"))) == len(PHOTOS)
