"""Disk caches in real runs of the entry points: a warm cache spares every encoder, a changed or
damaged image is re-encoded alone, a resumed run equals an uninterrupted one, two processes split
the fill, and a cache folder that cannot be written stops the run before any model loads."""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.tiny import build_sd3, build_sdxl, make_images
from tests.integration.conftest import accelerate_launch, sd_args

pytestmark = pytest.mark.integration

CACHES = ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"]
ENCODERS = {"vae": (AutoencoderKL, "encode"), "clip": (CLIPTextModel, "forward"),
            "clip_projection": (CLIPTextModelWithProjection, "forward"), "t5": (T5EncoderModel, "forward")}


@pytest.fixture(autouse=True)
def _reset_accelerate(fresh_accelerate_state):
    yield


class EncoderCalls:
    """Counts VAE-encoder and text-encoder calls; `before_first_step` is the count at the first
    optimizer step."""

    def __init__(self, monkeypatch):
        self.calls, self.before_first_step = Counter(), None
        for name, (cls, method) in ENCODERS.items():
            monkeypatch.setattr(cls, method, self.counting(name, getattr(cls, method)))
        self.hook = register_optimizer_step_pre_hook(self.first_step)

    def counting(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    def first_step(self, optimizer, args, kwargs):
        if self.before_first_step is None:
            self.before_first_step = Counter(self.calls)


def train(script, argv: list, monkeypatch) -> Counter:
    """One in-process run of `script`'s real entry point; the encoder calls before its first step."""
    calls = EncoderCalls(monkeypatch)
    try:
        assert run(script.main, script.parse_args([str(a) for a in argv])) == 0
    finally:
        calls.hook.remove()
        monkeypatch.undo()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return calls.before_first_step


def entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_warm_cache_spares_the_encoders_and_a_changed_or_damaged_image_is_encoded_alone(
        tiny_sd, image_folder, tmp_path, monkeypatch, caplog):
    data, cache = tmp_path / "images", tmp_path / "cache"
    shutil.copytree(image_folder, data)
    def argv(out: str) -> list:
        return sd_args(tiny_sd, data, tmp_path / out, "--max_train_steps", "1", "--report_to", "none",
                       "--latents_cache_dir", cache, *CACHES)

    cold = train(t2i, argv("cold"), monkeypatch)
    assert cold["vae"] == 8 and cold["clip"] > 0
    assert len(entries(cache / "latents")) == 8 and len(entries(cache / "text")) == 8

    warm = train(t2i, argv("warm"), monkeypatch)
    assert sum(warm.values()) == 0, f"a warm cache must spare every encoder, got {dict(warm)}"

    changed = sorted(data.glob("*.png"))[3]
    Image.new("RGB", (40, 32), (10, 200, 30)).save(changed)
    before = set(entries(cache / "latents"))
    assert train(t2i, argv("changed"), monkeypatch) == Counter({"vae": 1})
    (damaged,) = set(entries(cache / "latents")) - before   # the changed image's new entry

    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert train(t2i, argv("damaged"), monkeypatch) == Counter({"vae": 1})
    warning = next(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage())
    assert str(damaged) in warning and re.search(rf"{re.escape(str(changed))} \(row \d+\)", warning), warning
    assert load_file(damaged)["moments"].shape[0] == 8


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_disk_caches_resume_exactly_under_gradient_accumulation(tiny_sd, image_folder, tmp_path, monkeypatch,
                                                                buckets):
    """8 images, batch 1, accumulation 2: 4 updates per epoch; checkpoint-5 is mid-epoch 2. The
    uninterrupted run fills the cache cold, the resumed one reads it warm. With buckets, the images
    have three aspect ratios and each latent is cached at its own bucket's size."""
    common = ["--max_train_steps", "6", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "5", "--random_flip", "--report_to", "none",
              "--latents_cache_dir", tmp_path / "cache", *CACHES]
    if buckets:
        image_folder = make_images(tmp_path / "mixed", num_images=8, sizes=((40, 24), (24, 40), (32, 32)))
        common += ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64",
                   "--bucket_reso_steps", "8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(t2i, sd_args(tiny_sd, image_folder, straight, *common), monkeypatch)["vae"] == 16
    if buckets:  # the latents really are cached at three bucket shapes, not one square
        shapes = {tuple(entry["moments"].shape) for entry in map(load_file, (tmp_path / "cache").rglob("*.safetensors"))
                  if "moments" in entry}
        assert len(shapes) == 3, shapes
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-5", resumed / "checkpoint-5")
    calls = train(t2i, sd_args(tiny_sd, image_folder, resumed, *common, "--resume_from_checkpoint", "latest"),
                  monkeypatch)
    assert sum(calls.values()) == 0
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    base = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], base[k]) for k in a), "nothing was trained"


def test_sdxl_and_sd3_train_from_warm_disk_caches(image_folder, tmp_path, monkeypatch):
    sdxl, sd3 = build_sdxl(tmp_path / "sdxl"), build_sd3(tmp_path / "sd3")

    def sdxl_argv(out: str) -> list:
        return sd_args(sdxl, image_folder, tmp_path / out, "--max_train_steps", "1", "--report_to", "none",
                       "--proportion_empty_prompts", "0.5", "--latents_cache_dir", tmp_path / "sdxl-cache", *CACHES)

    def sd3_argv(out: str) -> list:
        return ["--pretrained_model_name_or_path", sd3, "--instance_data_dir", image_folder,
                "--instance_prompt", "a photo of sks shape", "--output_dir", tmp_path / out, "--resolution", "32",
                "--train_batch_size", "2", "--max_train_steps", "1", "--max_sequence_length", "16",
                "--report_to", "none", "--seed", "0", "--latents_cache_dir", tmp_path / "sd3-cache", *CACHES]

    assert train(sdxl_script, sdxl_argv("sdxl-cold"), monkeypatch)["vae"] == 8
    assert len(entries(tmp_path / "sdxl-cache" / "text")) == 9, "8 captions and the empty one"
    assert sum(train(sdxl_script, sdxl_argv("sdxl-warm"), monkeypatch).values()) == 0
    cold = train(sd3_script, sd3_argv("sd3-cold"), monkeypatch)
    assert cold["vae"] == 8 and cold["t5"] == 1
    assert sum(train(sd3_script, sd3_argv("sd3-warm"), monkeypatch).values()) == 0


def test_two_processes_split_the_fill_and_agree(tiny_sd, tmp_path):
    """With aspect-ratio buckets too: mixed-aspect images, each process trains whole one-bucket batches."""
    out = tmp_path / "ddp"
    data = make_images(tmp_path / "mixed", num_images=8, sizes=((40, 24), (24, 40), (32, 32)))
    buckets = ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8"]
    result = accelerate_launch("train_text_to_image.py", sd_args(tiny_sd, data, out, "--max_train_steps", "2",
                                                                 "--random_flip", "--report_to", "none", *CACHES,
                                                                 *buckets),
                               num_processes=2)
    log = result.stderr + result.stdout
    assert "identical on all 2 processes" in log
    # 8 images and their mirror images, each encoded by exactly one process.
    assert "Cached latents: 16 encoded (process 0: 8, process 1: 8), 0 reused" in log
    assert "Cached text-encoder outputs: 8 encoded (process 0: 4, process 1: 4), 0 reused" in log
    assert len(entries(out / "cache" / "latents")) == 16 and len(entries(out / "cache" / "text")) == 8
    assert not [p for p in (out / "cache").rglob("*") if p.is_file() and p.suffix != ".safetensors"]


def test_unwritable_cache_folder_is_named_before_any_model_loads(tiny_sd, image_folder, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        t2i.parse_args([str(a) for a in sd_args(tiny_sd, image_folder, tmp_path / "out",
                                                "--cache_latents_to_disk", "--latents_cache_dir", blocker / "c")])
    assert f"The cache folder {blocker / 'c'} (--latents_cache_dir) cannot be written" in capsys.readouterr().err
