"""kohya dataset configs in real SD 1.x runs: two subsets (one repeated twice with shuffled tags
and a kept first tag, one captioned by class_tokens with caption dropout) train, save a pipeline
that loads, show the text encoder the captions kohya's rules give, and resume exactly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.tiny import make_images

pytestmark = pytest.mark.integration
TAGS = ["red", "circle", "blue background", "small"]


@pytest.fixture(autouse=True)
def _reset(fresh_accelerate_state):
    yield


@pytest.fixture()
def config(tmp_path) -> Path:
    tagged = make_images(tmp_path / "tagged", num_images=3, layout="captions", size=32)
    for caption in tagged.glob("*.txt"):
        caption.write_text(", ".join(["sks", *TAGS]))
    make_images(tmp_path / "plain", num_images=2, layout="images", size=32)
    path = tmp_path / "dataset.toml"
    path.write_text("""
[general]
caption_extension = ".txt"

[[datasets]]
resolution = 32
batch_size = 2

  [[datasets.subsets]]
  image_dir = "tagged"
  num_repeats = 2
  shuffle_caption = true
  keep_tokens = 1
  caption_tag_dropout_rate = 0.25

  [[datasets.subsets]]
  image_dir = "plain"
  class_tokens = "toy"
  caption_dropout_rate = 0.5
""")
    return path


def argv(model: Path, config: Path, output: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(config), "--output_dir",
            str(output), "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none", "--max_train_steps", "6",
            "--checkpointing_steps", "3", *map(str, extra)]


class SeenCaptions:
    def __init__(self, monkeypatch):
        self.captions: list[str] = []
        original = StableDiffusion.encode_text

        def encode_text(family, models, captions, device):
            self.captions += list(captions)
            return original(family, models, captions, device)

        monkeypatch.setattr(StableDiffusion, "encode_text", encode_text)


def test_a_two_subset_config_trains_with_kohyas_epoch_and_captions(tiny_sd, config, tmp_path, monkeypatch):
    seen = SeenCaptions(monkeypatch)
    assert run(t2i.main, t2i.parse_args(argv(tiny_sd, config, tmp_path / "out"))) == 0
    # Epoch 0 is 3 images x 2 repeats + 2 images x 1 = 8 items: 4 batches of 2, 6 steps reach epoch 1.
    epoch0 = seen.captions[:8]
    tagged = [c for c in epoch0 if c.startswith("sks")]
    assert len(tagged) == 6 and sorted(epoch0).count("toy") + epoch0.count("") == 2, epoch0
    for caption in tagged:   # the kept first tag in place, the others a subset in any order
        first, *rest = caption.split(", ")
        assert first == "sks" and set(rest) <= set(TAGS) and len(set(rest)) == len(rest), caption
    assert len({c for c in seen.captions if c.startswith("sks")}) > 2, "tags were never shuffled"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert pipe.unet is not None and (tmp_path / "out" / "checkpoint-6").is_dir()


@pytest.mark.parametrize("cache", [False, True], ids=["encode-per-step", "text-cache-on-disk"])
def test_resume_with_caption_augmentation_equals_an_uninterrupted_run(tiny_sd, config, tmp_path, monkeypatch, caplog,
                                                                       cache):
    """Checkpoint 3 is mid-epoch 0; the resumed run goes on into epoch 1. With the disk text cache,
    every shuffled and dropped variant of both epochs is cached up front, and the resumed run finds
    them all warm: its text encoder never runs."""
    extra = ["--cache_text_encoder_outputs_to_disk", "--latents_cache_dir", tmp_path / "cache"] if cache else []
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level(logging.INFO):
        assert run(t2i.main, t2i.parse_args(argv(tiny_sd, config, straight, *extra))) == 0
    planned = [r.getMessage() for r in caplog.records if "caption variants for 2 epoch(s)" in r.getMessage()]
    assert bool(planned) == cache, planned
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    seen = SeenCaptions(monkeypatch)
    assert run(t2i.main, t2i.parse_args(argv(tiny_sd, config, resumed, *extra, "--resume_from_checkpoint",
                                             "latest"))) == 0
    if cache:
        assert seen.captions == [], "a warm text cache still encoded captions"
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    base = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], base[k]) for k in a), "nothing was trained"


def test_two_resolutions_train_in_one_run_from_cached_latents(tiny_sd, tmp_path, monkeypatch):
    """Two [[datasets]] over one folder, at 32 px (batch 2) and 64 px (batch 1): an epoch is one
    32-px batch and two 64-px batches, never mixed, read from the latent cache."""
    import sdft.trainer

    make_images(tmp_path / "shapes", num_images=2, layout="captions", size=48)
    path = tmp_path / "multi.toml"
    path.write_text("[general]\ncaption_extension = '.txt'\n"
                    "[[datasets]]\nresolution = 32\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = 'shapes'\n"
                    "[[datasets]]\nresolution = [64, 64]\nbatch_size = 1\n  [[datasets.subsets]]\n"
                    "  image_dir = 'shapes'\n")
    shapes = []
    original = sdft.trainer.training_step

    def recording(run_state, batch, micro_step):
        shapes.append(tuple(batch["latent_moments"].shape[:1]) + tuple(batch["latent_moments"].shape[-2:]))
        return original(run_state, batch, micro_step)

    monkeypatch.setattr(sdft.trainer, "training_step", recording)
    out = tmp_path / "out"
    assert run(t2i.main, t2i.parse_args(argv(tiny_sd, path, out, "--cache_latents", "--max_train_steps", "3"))) == 0
    assert sorted(shapes) == [(1, 32, 32), (1, 32, 32), (2, 16, 16)], shapes   # the tiny VAE halves sides
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sdxl_and_sd3_train_from_a_config_with_caption_dropout(tiny_sdxl, tmp_path, monkeypatch):
    """The other two scripts read the same file. SD3 (which had no caption dropout) drops captions,
    and its required --instance_prompt captions the images that have neither a caption file nor
    class_tokens. The captions are those of the batches the loop trains on."""
    import sdft.trainer
    import train_dreambooth_sd3 as sd3_script
    import train_text_to_image_sdxl as sdxl_script
    from sdft.tiny import build_sd3

    make_images(tmp_path / "plain", num_images=4, layout="images", size=32)
    subset = "[[datasets]]\nresolution = 32\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = 'plain'\n"
    (tmp_path / "sdxl.toml").write_text(subset + "  class_tokens = 'toy'\n  flip_aug = true\n")
    (tmp_path / "sd3.toml").write_text(subset + "  caption_dropout_rate = 0.5\n")
    seen: list[str] = []
    original = sdft.trainer.training_step

    def recording(run_state, batch, micro_step):
        seen.extend(batch["captions"])
        return original(run_state, batch, micro_step)

    monkeypatch.setattr(sdft.trainer, "training_step", recording)
    assert run(sdxl_script.main, sdxl_script.parse_args(
        argv(tiny_sdxl, tmp_path / "sdxl.toml", tmp_path / "sdxl", "--max_train_steps", "1"))) == 0
    assert seen == ["toy", "toy"] and (tmp_path / "sdxl" / "model_index.json").is_file()
    seen.clear()
    sd3 = build_sd3(tmp_path / "sd3")
    assert run(sd3_script.main, sd3_script.parse_args(
        [*argv(sd3, tmp_path / "sd3.toml", tmp_path / "sd3-out", "--max_train_steps", "4", "--max_sequence_length",
               "16"), "--instance_prompt", "a photo of sks"])) == 0
    assert sorted(set(seen)) == ["", "a photo of sks"] and len(seen) == 8, seen
    assert (tmp_path / "sd3-out" / "model_index.json").is_file()


def test_two_processes_resume_a_config_run_exactly_from_the_disk_text_cache(tiny_sd, config, tmp_path):
    """`accelerate launch` with 2 processes: the augmented caption variants are cached once and
    shared, and a run resumed mid-epoch ends with the uninterrupted run's weights."""
    from tests.integration.conftest import accelerate_launch

    common = ["--cache_text_encoder_outputs_to_disk", "--latents_cache_dir", tmp_path / "cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = accelerate_launch("train_text_to_image.py", argv(tiny_sd, config, straight, *common), num_processes=2)
    log = first.stderr + first.stdout
    assert "identical on all 2 processes" in log and "caption variants for" in log
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    again = accelerate_launch("train_text_to_image.py",
                              argv(tiny_sd, config, resumed, *common, "--resume_from_checkpoint", "latest"),
                              num_processes=2)
    assert "Cached text-encoder outputs: 0 encoded" in again.stderr + again.stdout
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
