"""Family modules on tiny models: conditioning shapes, SDXL micro-conditioning that matches the
crop actually applied, and latents scaled by the VAE's factor."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from sdft.data.latent_cache import sample_latents
from sdft.data.transforms import ImageTransform
from sdft.families.sd import StableDiffusion
from sdft.families.sdxl import StableDiffusionXL, micro_conditioning
from sdft.families.source import ModelSource
from sdft.tiny import build_sd, build_sd3, build_sdxl


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    family = StableDiffusionXL()
    return family, family.load(ModelSource(str(build_sdxl(tmp_path_factory.mktemp("m") / "sdxl"))))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    family = StableDiffusion()
    return family, family.load(ModelSource(str(build_sd(tmp_path_factory.mktemp("m") / "sd"))))


def test_micro_conditioning_is_original_size_crop_and_target():
    ids = micro_conditioning(torch.tensor([[48, 64], [72, 40]]), torch.tensor([[0, 5], [9, 0]]), (32, 32))
    assert ids.tolist() == [[48, 64, 0, 5, 32, 32], [72, 40, 9, 0, 32, 32]]


def test_sdxl_condition_uses_the_applied_crop_and_both_encoders(sdxl):
    family, models = sdxl
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    outs = [transform(Image.new("RGB", (64, 48), (200, 10, 10)), random.Random(seed)) for seed in range(2)]
    batch = {"pixel_values": torch.stack([o.pixels for o in outs]), "captions": ["a red circle", ""],
             "original_sizes": torch.tensor([o.original_size for o in outs]),
             "crop_top_lefts": torch.tensor([o.crop_top_left for o in outs])}
    with torch.no_grad():
        cond = family.condition(models, batch, torch.device("cpu"))
    hidden = models.text_encoder.config.hidden_size + models.text_encoder_2.config.hidden_size
    assert cond["encoder_hidden_states"].shape == (2, 77, hidden)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, models.text_encoder_2.config.projection_dim)
    expected = [[48, 64, *o.crop_top_left, 32, 32] for o in outs]
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == expected
    # The UNet accepts exactly this conditioning.
    latents = torch.zeros(2, 4, 16, 16)
    with torch.no_grad():
        pred = family.predict(models.unet, latents, torch.tensor([10, 500]), cond)
    assert pred.shape == latents.shape


def test_sdxl_vae_stays_fp32_unless_another_vae_is_given():
    assert StableDiffusionXL().vae_dtype(torch.float16) == torch.float32
    assert StableDiffusionXL(vae_path="madebyollin/sdxl-vae-fp16-fix").vae_dtype(torch.float16) == torch.float16


def test_sd_latents_are_a_seeded_posterior_sample_scaled_by_the_vae_factor(sd):
    family, models = sd
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = models.vae.encode(pixels).latent_dist
        expected = posterior.sample(generator=torch.Generator().manual_seed(0)) * models.vae.config.scaling_factor
        latents = family.scale_latents(models, sample_latents(models.vae, pixels, torch.Generator().manual_seed(0)))
    assert models.vae.config.scaling_factor != 1.0
    assert torch.equal(latents, expected)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
def test_sd3_step_for_each_weighting_scheme(tmp_path_factory, scheme, monkeypatch):
    """The flags build an objective whose loss is finite and reaches the transformer's weights."""
    import train_dreambooth_sd3 as sd3_script
    from sdft.builders import flow_objective
    from sdft.families.sd3 import StableDiffusion3
    from sdft.tiny import make_images

    root = tmp_path_factory.mktemp("sd3")
    monkeypatch.chdir(root)
    model = build_sd3(root / "model")
    args = sd3_script.parse_args([f"--pretrained_model_name_or_path={model}", "--instance_prompt=a sks dog",
                                  f"--instance_data_dir={make_images(root / 'dog', 1, layout='images')}",
                                  f"--weighting_scheme={scheme}", "--max_sequence_length=8"])
    family = StableDiffusion3(max_sequence_length=8)
    models = family.load(ModelSource(str(model)))
    objective = flow_objective(args, models.noise_scheduler, torch.device("cpu"))
    latents = torch.randn(2, 16, 16, 16)
    noised = objective.noise(latents, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = family.condition(models, {"captions": ["a sks dog", "a dog"]}, torch.device("cpu"))
    loss = objective.loss(family.predict(models.transformer, noised.noisy, noised.timesteps, cond), noised).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.transformer.parameters())
