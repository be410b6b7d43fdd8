"""Real `accelerate launch train_text_to_image.py` runs on a tiny SD model, asserting what a user
would check: the files written, a pipeline that loads and generates, checkpoints that rotate and
resume, a resumed run equal to an uninterrupted one, and two processes that agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.integration.conftest import accelerate_launch, generate, sd_args

pytestmark = pytest.mark.integration
SCRIPT = "train_text_to_image.py"


def checkpoints(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("checkpoint")}


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in log_dir.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return sorted(steps)


def test_full_finetune_writes_a_pipeline_that_generates(tiny_sd, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    result = accelerate_launch(SCRIPT, sd_args(
        tiny_sd, image_folder, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--validation_prompts", "a red circle", "a blue square", "--center_crop", "--random_flip",
        "--snr_gamma", "5.0", "--noise_offset", "0.05", "--input_perturbation", "0.1", "--dream_training",
        "--gradient_checkpointing", "--lr_scheduler", "cosine", "--save_single_file", "--save_precision", "fp16"))

    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert sorted(p.name for p in (out / "validation" / "final").glob("*.png")) == ["00.png", "01.png"]
    assert list((out / "validation" / "epoch-0000").glob("*.png"))
    assert scalar_steps(out / "logs", "train_loss") == [1, 2, 3, 4], "the loss must be logged every step"
    assert scalar_steps(out / "logs", "lr") == [1, 2, 3, 4]
    card = (out / "README.md").read_text()
    assert "validation/final/00.png" in card and "StableDiffusionPipeline.from_pretrained" in card
    assert_pictures_and_summary(out, result.stderr, card)

    base = unet_weights(tiny_sd)
    trained = unet_weights(out)
    assert any(not torch.equal(base[k], trained[k]) for k in base), "training did not change the UNet"

    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = generate(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    # A checkpoint's UNet drops into the base pipeline, as in the diffusers docs.
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="checkpoint-2/unet")
    assert np.isfinite(generate(StableDiffusionPipeline.from_pretrained(tiny_sd, unet=unet))).all()

    # --save_single_file: one original-layout checkpoint, in --save_precision, that diffusers reads back.
    single = StableDiffusionPipeline.from_single_file(str(out / "out.safetensors"), config=str(tiny_sd),
                                                      local_files_only=True)
    assert all(torch.equal(v, trained[k].half().to(v.dtype)) for k, v in single.unet.state_dict().items())
    with safe_open(str(out / "out.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1" and metadata["ss_steps"] == "4"
    assert metadata["ss_sd_model_name"] == str(tiny_sd) and metadata["modelspec.title"] == "out"


def assert_pictures_and_summary(out: Path, log: str, card: str) -> None:
    """loss.png, validation/grid.png (2 prompts x the epoch-0 and final rounds), the summary lines."""
    from PIL import Image

    from sdft.plots import LOSS_SIZE_PX, grid_size_px

    assert Image.open(out / "loss.png").size == LOSS_SIZE_PX
    assert json.loads((out / "validation" / "rounds.json").read_text()) == {"epoch-0000": 4, "final": 4}
    assert Image.open(out / "validation" / "grid.png").size == grid_size_px(rows=2, columns=2)
    assert "![loss](loss.png)" in card and "![grid](validation/grid.png)" in card
    summary = log[log.index("Run summary"):]
    for line in ("steps: 4", "images seen: 8", "time to first step: ", "steady steps/s: ", "steady images/s: ",
                 "peak memory: ", "peak RSS", "step time: data loading "):
        assert line in summary, line
        assert line in card, line


def test_lora_under_bf16_from_accelerate_config_loads_with_load_lora_weights(tiny_sd, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    # bf16 comes from the launcher (as from `accelerate config`), not from --mixed_precision.
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, out, "--use_lora", "--rank", "4",
                                      "--max_train_steps", "2", "--checkpointing_steps", "1", "--output_kohya_format"),
                      mixed_precision="bf16")

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in k and k.startswith("unet.") for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values()), "LoRA weights must be trained in fp32"
    assert not (out / "unet").exists(), "a LoRA run must not write a full UNet"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    after = generate(pipe)
    assert np.isfinite(after).all()
    assert not np.allclose(before, after), "the LoRA had no effect on the generated image"
    # --output_kohya_format: the same LoRA under the names ComfyUI/A1111/Forge load.
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    np.testing.assert_allclose(generate(pipe), after, atol=1e-5)
    # Every LoRA file, checkpoints' included, says what it is and how far it was trained.
    for path, steps in ((out / "pytorch_lora_weights.safetensors", "2"),
                        (out / "pytorch_lora_weights_kohya.safetensors", "2"),
                        (out / "checkpoint-1" / "pytorch_lora_weights.safetensors", "1")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_steps"]) == ("4", "4", steps)
        assert metadata["ss_base_model_version"] == "sd_v1" and metadata["modelspec.resolution"] == "32x32"
        assert not any(str(out) in value for value in metadata.values()), "no paths beyond what was passed"


def test_resumed_run_equals_uninterrupted_run(tiny_sd, image_folder, tmp_path):
    """8 images, batch 2, 2 accumulation steps: 2 optimizer steps per epoch, so checkpoint-3 lies in
    the middle of the second epoch. EMA is on, so its shadow weights must resume exactly too."""
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
              "--use_ema", "--foreach_ema", "--offload_ema", "--random_flip", "--lr_scheduler", "linear"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, straight, *common))
    state = json.loads((straight / "checkpoint-3" / "training_state.json").read_text())
    assert state == {"global_step": 3, "epoch": 1, "batches_in_epoch": 2, "seed": 0, "skipped_steps": 0}

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, resumed, *common, "--resume_from_checkpoint", "latest"))

    for sub in ("checkpoint-6/unet", "checkpoint-6/unet_ema", "unet"):
        a = load_file(straight / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{sub}: resumed weights differ"


def test_lora_with_8bit_adam_resumes_exactly(tiny_sd, image_folder, tmp_path):
    common = ["--use_lora", "--rank", "4", "--use_8bit_adam", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, straight, *common))
    assert "optimizer = AdamW8bit" in first.stderr + first.stdout
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, resumed, *common,
                                      "--resume_from_checkpoint", str(resumed / "checkpoint-2")))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_rotation_and_resume_by_name(tiny_sd, image_folder, tmp_path):
    """The upstream pattern: {2,4}, then resume from checkpoint-4 to step 8 with a limit of 2 -> {6,8},
    here from a checkpoint in the diffusers layout."""
    out = tmp_path / "out"
    base = ["--checkpointing_steps", "2", "--prediction_type", "v_prediction", "--snr_gamma", "5.0"]
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, out, *base, "--max_train_steps", "4"))
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    (out / "checkpoints.txt").write_text("a stray file must not confuse rotation or 'latest'\n")
    # A checkpoint as diffusers' script writes it has no training_state.json (the step comes from the
    # name) and no manifest.json (it is trusted as it is).
    (out / "checkpoint-4" / "training_state.json").unlink()
    (out / "checkpoint-4" / "manifest.json").unlink()
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, out, *base, "--max_train_steps", "8",
                                      "--resume_from_checkpoint", "checkpoint-4", "--checkpoints_total_limit", "2"))
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8", "checkpoints.txt"}
    assert not list(out.glob(".checkpoint-*")), "a partial checkpoint was left behind"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_two_processes_agree_and_write_checkpoints_once(tiny_sd, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ddp"
    result = accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, out, "--max_train_steps", "3",
                                               "--checkpointing_steps", "2"), num_processes=2)
    assert "identical on all 2 processes" in result.stderr + result.stdout
    assert checkpoints(out) == {"checkpoint-2"}
    files = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"unet", "training_state.json", "optimizer.bin", "scheduler.bin",
            "random_states_0.pkl", "random_states_1.pkl"} <= files
    assert not list(out.glob(".checkpoint-*"))
    assert np.isfinite(generate(StableDiffusionPipeline.from_pretrained(out))).all()
