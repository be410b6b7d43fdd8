"""Real `accelerate launch train_dreambooth_sd3.py` runs on a tiny SD3 model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdft.tiny import make_images
from tests.integration.conftest import accelerate_launch
from tests.integration.conftest import generate as generate_image

pytestmark = pytest.mark.integration
SCRIPT = "train_dreambooth_sd3.py"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = make_images(tmp_path_factory.mktemp("data") / "dog", num_images=4, layout="images")
    (folder / "notes.txt").write_text("not an image: skipped with a warning")
    return folder


def db_args(model: Path, data: Path, output: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--max_sequence_length", "16",
            *extra]


def generate(pipe, prompt: str = "a photo of sks dog"):
    return generate_image(pipe, prompt, max_sequence_length=16)


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_with_prior_preservation_and_prodigy(tiny_sd3, instance_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out, class_dir = tmp_path / "out", tmp_path / "dogs"
    result = accelerate_launch(SCRIPT, db_args(
        tiny_sd3, instance_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of dog",
        "--num_class_images", "3", "--sample_batch_size", "2", "--optimizer", "prodigy", "--learning_rate", "1.0",
        "--weighting_scheme", "none", "--validation_prompt", "a photo of sks dog in a bucket",
        "--num_validation_images", "1"))

    assert "notes.txt" in result.stderr + result.stdout, "the skipped file should be named in a warning"
    assert len(list(class_dir.glob("*.jpg"))) == 3
    assert (out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "validation" / "final" / "00.png").is_file()
    assert "sks dog" in (out / "README.md").read_text()
    image = generate(StableDiffusion3Pipeline.from_pretrained(out))
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_lora_blocks_and_layers_select_exactly_those_modules(tiny_sd3, instance_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "lora"
    accelerate_launch(SCRIPT, db_args(tiny_sd3, instance_dir, out, "--use_lora", "--rank", "4", "--lora_blocks", "1",
                                      "--lora_layers", "attn.to_k,attn.to_v", "--max_train_steps", "2",
                                      "--checkpointing_steps", "10", "--upcast_before_saving"))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in weights), "SD3 LoRA files use PEFT key names"
    adapted = {k.split(".lora_")[0] for k in weights}
    assert adapted == {"transformer.transformer_blocks.1.attn.to_k", "transformer.transformer_blocks.1.attn.to_v"}
    assert all(v.dtype == torch.float32 for v in weights.values())

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert not np.allclose(before, generate(pipe)), "the LoRA had no effect"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_text_encoder_training_resumes_exactly(tiny_sd3, instance_dir, tmp_path, mode):
    extra = ["--use_lora", "--rank", "4", "--cache_latents"] if mode == "lora" else []
    common = ["--train_text_encoder", "--text_encoder_lr", "5e-4", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--random_flip", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    accelerate_launch(SCRIPT, db_args(tiny_sd3, instance_dir, straight, *common))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    accelerate_launch(SCRIPT, db_args(tiny_sd3, instance_dir, resumed, *common, "--resume_from_checkpoint", "latest"))

    if mode == "lora":
        a, b = (load_file(d / "checkpoint-4" / "pytorch_lora_weights.safetensors") for d in (straight, resumed))
        assert {k.split(".")[0] for k in a} == {"transformer", "text_encoder", "text_encoder_2"}
        assert weights_equal(a, b)
        return
    checkpoint = straight / "checkpoint-4"
    assert (checkpoint / "text_encoder").is_dir() and (checkpoint / "text_encoder_2").is_dir()
    assert not (checkpoint / "text_encoder_3").exists(), "T5 is frozen and must not be checkpointed"
    for role, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors")):
        a, b = (load_file(d / "checkpoint-4" / role / name) for d in (straight, resumed))
        assert weights_equal(a, b), f"{role} differs after resume"
    base = load_file(tiny_sd3 / "text_encoder" / "model.safetensors")
    trained = load_file(straight / "text_encoder" / "model.safetensors")
    assert not weights_equal(base, trained), "the text encoder was not trained"


def test_two_processes_share_class_generation_and_agree(tiny_sd3, instance_dir, tmp_path):
    out, class_dir = tmp_path / "ddp", tmp_path / "dogs"
    result = accelerate_launch(SCRIPT, db_args(
        tiny_sd3, instance_dir, out, "--use_lora", "--rank", "4", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--with_prior_preservation", "--class_data_dir", class_dir,
        "--class_prompt", "a photo of dog", "--num_class_images", "3", "--sample_batch_size", "1"),
        num_processes=2)
    assert "identical on all 2 processes" in result.stderr + result.stdout
    names = sorted(p.name.split("-")[0] for p in class_dir.glob("*.jpg"))
    assert names == ["0", "1", "2"], "each class image must be generated exactly once across processes"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2"}
    assert (out / "pytorch_lora_weights.safetensors").is_file()
