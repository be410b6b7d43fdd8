"""Real `accelerate launch train_text_to_image_sdxl.py` runs on a tiny SDXL model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import accelerate_launch, generate, sd_args

pytestmark = pytest.mark.integration
SCRIPT = "train_text_to_image_sdxl.py"


def test_full_finetune_with_ema_and_timestep_bias(tiny_sdxl, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    accelerate_launch(SCRIPT, sd_args(
        tiny_sdxl, image_folder, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--use_ema", "--snr_gamma", "5.0", "--proportion_empty_prompts", "0.2",
        "--timestep_bias_strategy", "later", "--timestep_bias_portion", "0.25", "--timestep_bias_multiplier", "2",
        "--random_flip", "--validation_prompt", "a red circle", "--num_validation_images", "1"))

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "validation" / "final" / "00.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = generate(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    # The raw (non-EMA) UNet of the checkpoint differs from the exported EMA UNet.
    raw = UNet2DConditionModel.from_pretrained(out, subfolder="checkpoint-4/unet").state_dict()
    ema = pipe.unet.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_lora_on_unet_and_both_text_encoders_resumes_and_exports_kohya(tiny_sdxl, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    common = ["--use_lora", "--rank", "4", "--train_text_encoder", "--output_kohya_format",
              "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    accelerate_launch(SCRIPT, sd_args(tiny_sdxl, image_folder, straight, *common))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    accelerate_launch(SCRIPT, sd_args(tiny_sdxl, image_folder, resumed, *common, "--resume_from_checkpoint", "latest"))

    weights = load_file(straight / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all("lora" in k for k in weights)
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)

    kohya = load_file(straight / "pytorch_lora_weights_kohya.safetensors")
    assert {k.split("_")[1] for k in kohya if k.startswith("lora_")} == {"unet", "te1", "te2"}
    # ComfyUI and Forge look the text encoders up under their text_model level (#8).
    assert all(k.startswith(("lora_te1_text_model_", "lora_te2_text_model_")) for k in kohya if k.startswith("lora_te"))
    assert any(k.endswith(".alpha") for k in kohya) and any(".lora_down." in k for k in kohya)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = generate(pipe)
    pipe.load_lora_weights(straight)
    diffusers_image = generate(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(straight, weight_name="pytorch_lora_weights_kohya.safetensors")
    kohya_image = generate(pipe)
    assert not np.allclose(base, diffusers_image), "the LoRA had no effect"
    np.testing.assert_allclose(kohya_image, diffusers_image, atol=1e-5)
