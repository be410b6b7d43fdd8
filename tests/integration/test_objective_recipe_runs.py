"""Issue 21 in real runs (in-process, tiny models): each family trains to the end with a non-default
loss type and recipe flags and writes its model; SD3 keeps an EMA that is saved and resumes exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.families.sd3 import StableDiffusion3
from sdft.tiny import build_sd3, make_images
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration
STEPS = ["--max_train_steps", "3", "--checkpointing_steps", "100", "--report_to", "none"]
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    yield


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory):
    """Tiny SD3 models by variant (sdft.tiny.SD3_VARIANTS), each built once."""
    built: dict[str, Path] = {}

    def model(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_sd3(tmp_path_factory.mktemp("models") / variant, variant=variant)
        return built[variant]

    return model


@pytest.fixture(scope="module")
def tiny_sd3(sd3_models) -> Path:
    return sd3_models("sd3")


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "dog", num_images=4, layout="images")


def sd3_args(model: Path, data: Path, output: Path, *extra) -> list[str]:
    return [str(a) for a in [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", output,
        "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--max_sequence_length", "16", *extra]]


def train_losses(monkeypatch) -> list[float]:
    """Every train_loss the run logs, in order."""
    values: list[float] = []
    original = Accelerator.log

    def log(accelerator, logged, step=None, log_kwargs=None):
        if "train_loss" in logged:
            values.append(float(logged["train_loss"]))
        return original(accelerator, logged, step=step, log_kwargs=log_kwargs or {})

    monkeypatch.setattr(Accelerator, "log", log)
    return values


def train(script, argv: list, monkeypatch) -> list[float]:
    losses = train_losses(monkeypatch)
    assert run(script.main, script.parse_args([str(a) for a in argv])) == 0
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    return losses


def test_sd_full_finetune_with_scheduled_huber_and_kohya_noise(tiny_sd, image_folder, tmp_path, monkeypatch):
    recipe = ["--loss_type", "huber", "--huber_schedule", "snr", "--huber_c", "0.1", "--debiased_estimation_loss",
              "--multires_noise_iterations", "3", "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01",
              "--ip_noise_gamma", "0.1", "--min_timestep", "100", "--max_timestep", "900", "--snr_gamma", "5"]
    huber = train(t2i, sd_args(tiny_sd, image_folder, tmp_path / "huber", *STEPS, *recipe), monkeypatch)
    assert (tmp_path / "huber" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "huber" / "model_index.json").is_file()
    plain = train(t2i, sd_args(tiny_sd, image_folder, tmp_path / "plain", *STEPS), monkeypatch)
    assert huber[0] != plain[0], "the recipe flags changed nothing"


def test_sdxl_lora_with_smooth_l1_and_random_strength_noise(tiny_sdxl, image_folder, tmp_path, monkeypatch):
    recipe = ["--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--noise_offset", "0.05",
              "--noise_offset_random_strength", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength",
              "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2", "--min_timestep", "200"]
    train(sdxl_script, sd_args(tiny_sdxl, image_folder, tmp_path / "sdxl", *STEPS, "--use_lora", "--rank", "4",
                               *recipe), monkeypatch)
    assert load_file(tmp_path / "sdxl" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("variant, extra", [
    ("sd3", ["--training_shift", "3"]),
    ("sd3", ["--resolution_dependent_shift"]),
    ("sd35-medium", ["--training_shift", "3", "--pos_emb_random_crop_rate", "0.5"]),
    ("sd35-large", ["--resolution_dependent_shift"]),
], ids=["sd3-training-shift", "sd3-resolution-shift", "sd35-medium-pos-crop", "sd35-large-resolution-shift"])
def test_sd3_full_finetune_with_l1_and_uniform_shifted_sampling(sd3_models, instance_dir, tmp_path, monkeypatch,
                                                                 variant, extra):
    model = sd3_models(variant)
    recipe = ["--loss_type", "l1", "--timestep_sampling", "uniform", *extra]
    train(sd3_script, sd3_args(model, instance_dir, tmp_path / "sd3", *STEPS, *recipe), monkeypatch)
    trained, base = load_file(tmp_path / "sd3" / TRANSFORMER), load_file(model / TRANSFORMER)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize("variant", ["sd3", "sd35-medium"])
def test_sd3_ema_is_saved_and_resumes_exactly(sd3_models, instance_dir, tmp_path, monkeypatch, variant):
    tiny_sd3 = sd3_models(variant)
    # sd35-medium: with the positional-embedding crop, whose draws must replay on resume too.
    crop = ["--pos_emb_random_crop_rate", "0.5"] if variant == "sd35-medium" else []
    common = [*crop, "--use_ema", "--max_train_steps", "5", "--checkpointing_steps", "3", "--report_to", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(sd3_script.main, sd3_script.parse_args(sd3_args(tiny_sd3, instance_dir, straight, *common))) == 0
    ema_file = straight / "checkpoint-3" / "transformer_ema" / "diffusion_pytorch_model.safetensors"
    assert ema_file.is_file(), "the checkpoint holds no EMA weights"

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    # Checkpointing every 5 steps does not change the training; it lets us read the state at step 5.
    assert run(sd3_script.main, sd3_script.parse_args(
        sd3_args(tiny_sd3, instance_dir, resumed, *common, "--resume_from_checkpoint", "latest",
                 "--checkpointing_steps", "5"))) == 0

    a, b = (load_file(d / TRANSFORMER) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "3 + 2 steps differ from 5 straight"
    # The saved model is the EMA at step 5, not the last trained weights (they differ at decay < 1).
    step5 = resumed / "checkpoint-5"
    ema = load_file(step5 / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    trained = load_file(step5 / TRANSFORMER)
    assert all(torch.equal(a[k], ema[k].to(a[k].dtype)) for k in a)
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)


def test_sd3_lora_with_t5_mask_caches_and_validates(tiny_sd3, instance_dir, tmp_path, monkeypatch):
    """The mask in training, the text cache (keyed by it) and the validation images (encoded the same way)."""
    output = tmp_path / "masked"
    argv = sd3_args(tiny_sd3, instance_dir, output, *STEPS, "--use_lora", "--apply_t5_attn_mask",
                    "--cache_text_encoder_outputs_to_disk", "--validation_prompt", "a photo of sks dog in a bucket",
                    "--num_validation_images", "1", "--validation_epochs", "1")
    encoded = []
    original = StableDiffusion3.prompt_inputs

    def prompt_inputs(self, pipeline, prompt, negative_prompt, device):
        inputs = original(self, pipeline, prompt, negative_prompt, device)
        encoded.append(sorted(inputs))
        return inputs

    monkeypatch.setattr(StableDiffusion3, "prompt_inputs", prompt_inputs)
    train(sd3_script, argv, monkeypatch)
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert list((output / "validation").rglob("*.png")), "no validation image"
    assert encoded and all("prompt_embeds" in keys and "negative_prompt_embeds" in keys for keys in encoded)
    cached = list((output / "cache").rglob("*"))
    assert any(path.is_file() for path in cached), "no text cache written"
