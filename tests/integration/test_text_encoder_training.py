"""--train_text_encoder in the SD 1.x script (full and LoRA) and SDXL full fine-tunes of its text
encoders with --learning_rate_te1/--learning_rate_te2 (issue 16): the encoders move, a resumed run
ends where the straight one does, and the outputs load in diffusers with the trained encoders."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from tests.integration.conftest import generate, sd_args

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh(fresh_accelerate_state):
    yield


def train(script, argv: list) -> None:
    assert run(script.main, script.parse_args([str(a) for a in argv])) == 0


def straight_and_resumed(script, model, images, tmp_path, *flags) -> tuple:
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none", *flags]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(script, sd_args(model, images, straight, *common))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(script, sd_args(model, images, resumed, *common, "--resume_from_checkpoint", "latest"))
    return straight, resumed


def states(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_sd1_text_encoder_lora_resumes_exactly_and_loads(tiny_sd, image_folder, tmp_path):
    straight, resumed = straight_and_resumed(t2i, tiny_sd, image_folder, tmp_path, "--train_text_encoder",
                                             "--use_lora", "--rank", "4", "--output_kohya_format")
    weights, again = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (straight, resumed))
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder"}
    assert_equal(weights, again)
    kohya = load_file(straight / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_te_") for k in kohya)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(straight))
        after = pipe.text_encoder(ids)[0]
    assert not torch.allclose(before, after)   # the LoRA reaches the text encoder in diffusers
    assert generate(pipe).shape == (32, 32, 3)


def test_sdxl_full_fine_tune_of_both_text_encoders_with_their_own_rates(tiny_sdxl, image_folder, tmp_path):
    straight, resumed = straight_and_resumed(sdxl_script, tiny_sdxl, image_folder, tmp_path, "--train_text_encoder",
                                             "--learning_rate_te1", "1e-3", "--learning_rate_te2", "5e-4")
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    trained = StableDiffusionXLPipeline.from_pretrained(str(straight))
    again = StableDiffusionXLPipeline.from_pretrained(str(resumed))
    for role in ("text_encoder", "text_encoder_2", "unet"):
        assert moved(states(getattr(base, role)), states(getattr(trained, role))), role
        assert_equal(states(getattr(trained, role)), states(getattr(again, role)))
    assert generate(trained).shape == (32, 32, 3)


def test_sdxl_learning_rate_te_zero_keeps_that_encoder_frozen(tiny_sdxl, image_folder, tmp_path, capsys):
    out = tmp_path / "te1-only"
    train(sdxl_script, sd_args(tiny_sdxl, image_folder, out, "--max_train_steps", "1", "--report_to", "none",
                               "--train_text_encoder", "--learning_rate_te2", "0"))
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    trained = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert moved(states(base.text_encoder), states(trained.text_encoder))
    assert_equal(states(base.text_encoder_2), states(trained.text_encoder_2))
    with pytest.raises(SystemExit):
        sdxl_script.parse_args([str(a) for a in sd_args(tiny_sdxl, image_folder, out, "--learning_rate_te1", "1e-4")])
    assert "add --train_text_encoder" in capsys.readouterr().err


def test_train_text_encoder_frac_stops_the_encoder_after_that_fraction(tiny_sd, image_folder, tmp_path, capsys):
    """4 steps with --train_text_encoder_frac 0.5 leave the text encoder where 2 steps do, the UNet not."""
    half, short = tmp_path / "half", tmp_path / "short"
    train(t2i, sd_args(tiny_sd, image_folder, half, "--max_train_steps", "4", "--report_to", "none",
                       "--train_text_encoder", "--train_text_encoder_frac", "0.5"))
    train(t2i, sd_args(tiny_sd, image_folder, short, "--max_train_steps", "2", "--report_to", "none",
                       "--train_text_encoder"))
    a = StableDiffusionPipeline.from_pretrained(str(half), safety_checker=None)
    b = StableDiffusionPipeline.from_pretrained(str(short), safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    assert moved(states(base.text_encoder), states(a.text_encoder))
    assert_equal(states(a.text_encoder), states(b.text_encoder))
    assert moved(states(a.unet), states(b.unet))
    with pytest.raises(SystemExit):
        t2i.parse_args([str(x) for x in sd_args(tiny_sd, image_folder, half, "--train_text_encoder_frac", "0.5")])
    assert "add --train_text_encoder" in capsys.readouterr().err


def test_sd1_full_text_encoder_training_with_ema_resumes_exactly_and_exports_the_averages(tiny_sd, image_folder,
                                                                                         tmp_path):
    """--use_ema averages the trained text encoder too (issue 16): the folder and the single file hold
    the averaged encoder and UNet, not the last raw weights."""
    straight, resumed = straight_and_resumed(t2i, tiny_sd, image_folder, tmp_path, "--train_text_encoder", "--use_ema",
                                             "--save_single_file", "--save_precision", "fp32")
    last = straight / "checkpoint-4"
    raw_encoder = states(CLIPTextModel.from_pretrained(str(last / "text_encoder")))
    averaged = load_file(last / "text_encoder_ema" / "ema.safetensors")
    exported = StableDiffusionPipeline.from_pretrained(str(straight), safety_checker=None)
    encoder = states(exported.text_encoder)
    assert averaged.keys() <= encoder.keys()
    assert all(torch.equal(encoder[k], averaged[k]) for k in averaged)   # the folder holds the EMA weights
    assert moved({k: raw_encoder[k] for k in averaged}, averaged)
    assert moved(states(StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None).text_encoder), encoder)
    assert_equal(states(exported.unet), states(UNet2DConditionModel.from_pretrained(str(last / "unet_ema"))))
    single = StableDiffusionPipeline.from_single_file(str(straight / "straight.safetensors"), config=str(tiny_sd),
                                                      local_files_only=True, safety_checker=None)
    assert all(torch.equal(states(single.text_encoder)[k], averaged[k]) for k in averaged)
    again = StableDiffusionPipeline.from_pretrained(str(resumed), safety_checker=None)
    assert_equal(encoder, states(again.text_encoder))
    assert_equal(states(exported.unet), states(again.unet))
