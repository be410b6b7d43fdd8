"""LoRA on a quantized frozen base (--base_precision, --text_encoder_precision, kohya's --fp8_base):
the run trains with the base stored in fp8/int8/nf4 (torchao, on the CPU here), and the LoRA file
it writes loads on the full-precision base in diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

import sdft.trainer
import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.families.source import ModelSource
from sdft.output import load_saved_lora
from sdft.quantization import BasePrecision, quantized_size
from sdft.tiny import build_sd3
from tests.integration.conftest import generate, sd_args

pytestmark = pytest.mark.integration
STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "100", "--report_to", "none", "--learning_rate", "1e-2"]


@pytest.fixture()
def seen(monkeypatch, fresh_accelerate_state) -> dict:
    """At the start of training: (quantized, all) Linear layers of each model part, and the dtypes
    of the trained (adapter) parameters."""
    captured = {}
    train = sdft.trainer.train

    def capture(run_):
        for role, module in vars(run_.models).items():
            if isinstance(module, torch.nn.Module):
                captured[role] = quantized_size(module)
        captured["trained dtypes"] = {p.dtype for m in run_.trained.modules.values() for p in m.parameters()
                                      if p.requires_grad}
        return train(run_)

    monkeypatch.setattr(sdft.trainer, "train", capture)
    return captured


def adapted_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(layer, BaseTunerLayer) for layer in model.modules())


def assert_loads(pipe, output) -> torch.nn.Module:
    """The file loads on the full-precision base: an adapter on every layer it names, trained (B no longer zero)."""
    pipe.load_lora_weights(str(output))
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    ups = [p for name, p in denoiser.named_parameters() if ".lora_B." in name]
    assert ups and adapted_layers(denoiser) == len(ups) and any(p.abs().sum() > 0 for p in ups)
    return denoiser


def test_lora_on_an_nf4_unet_loads_on_the_full_precision_base(tiny_sd, image_folder, tmp_path, seen):
    """nf4 here, fp8 (SDXL) and int8 (SD3) below: each format trains and exports once."""
    fmt, output = "nf4", tmp_path / "out"
    argv = sd_args(tiny_sd, image_folder, output, *STEPS, "--use_lora", "--base_precision", fmt)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    quantized, linears = seen["unet"]
    assert quantized == linears > 0 and seen["text_encoder"][0] == 0
    assert seen["trained dtypes"] == {torch.float32}
    assert f"quantized base (denoiser {fmt}; torchao)" in (output / "README.md").read_text()
    assert_loads(StableDiffusionPipeline.from_pretrained(str(tiny_sd)), output)
    # The final images' pipeline: the same file on the base quantized as the run's was.
    final = load_saved_lora(StableDiffusion(), ModelSource(str(tiny_sd)), output, torch.float32,
                            precision=BasePrecision(denoiser=fmt))
    assert quantized_size(final.unet) == seen["unet"] and adapted_layers(final.unet) > 0


def test_fp8_base_alias_quantizes_sdxl_unet_and_text_encoders_with_val_loss(tiny_sdxl, image_folder, tmp_path, seen):
    """kohya's --fp8_base: the UNet and both text encoders (trained through LoRA here) in fp8, with
    bf16 compute; val_loss on held-out images runs on the same quantized base."""
    output = tmp_path / "out"
    argv = sd_args(tiny_sdxl, image_folder, output, *STEPS, "--use_lora", "--train_text_encoder", "--fp8_base",
                   "--mixed_precision", "bf16", "--validation_split", "0.25", "--validate_every_n_steps", "2",
                   "--report_to", "tensorboard")
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    assert all(seen[role][0] == seen[role][1] > 0 for role in ("unet", "text_encoder", "text_encoder_2"))
    assert list((output / "logs").rglob("events.out.tfevents*")), "no val_loss log"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    assert_loads(pipe, output)
    assert adapted_layers(pipe.text_encoder) > 0 and adapted_layers(pipe.text_encoder_2) > 0


def test_sd3_lora_on_int8_transformer_and_nf4_text_encoders(image_folder, tmp_path, seen):
    model = build_sd3(tmp_path / "tiny-sd3")
    output = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", image_folder, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2",
            "--max_sequence_length", "16", "--seed", "0", *STEPS, "--use_lora", "--base_precision", "int8",
            "--text_encoder_precision", "nf4"]
    assert run(sd3_script.main, sd3_script.parse_args([str(a) for a in argv])) == 0
    assert seen["transformer"][0] == seen["transformer"][1] > 0
    assert all(seen[role][0] > 0 for role in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model))
    before = generate(pipe, max_sequence_length=16)
    assert_loads(pipe, output)
    assert not np.allclose(before, generate(pipe, max_sequence_length=16)), "the LoRA changed nothing"
