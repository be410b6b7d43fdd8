"""--blocks_to_swap through the real entry points, in-process, on the tiny SDXL and SD3 models.

There is no accelerator here, so the run's (host, compute) pair is set to (cpu, cpu): the swapper
still copies every block in before it runs and points it back at its host copy after, moves the
gradients with it, and runs the fused updates on release. The weights after 4 steps must equal a run
without swapping, bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth_sd3 as sd3_script
import train_text_to_image_sdxl as sdxl_script
from sdft import block_swap, builders
from sdft.cli import run
from sdft.tiny import make_images
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration

STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "100", "--mixed_precision", "no", "--train_batch_size", "1"]


@pytest.fixture(scope="module")
def dog_images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "dog", num_images=4, layout="images")


def freshly_allocated(load):
    """The loaded weights are views into the checkpoint's buffer, 8-byte aligned; the swapper's copies
    are new, 64-byte aligned allocations, and the CPU's matrix kernels round differently on those
    (the same model, deep-copied, gives another last bit). Both runs get fresh weights, so that what
    is compared is the swapping."""
    def loaded(*args, **kwargs):
        models = load(*args, **kwargs)
        for module in vars(models).values():
            if isinstance(module, torch.nn.Module):
                for param in module.parameters():
                    param.data = param.data.clone()
        return models
    return loaded


@pytest.fixture()
def swappers(monkeypatch, one_thread) -> list[block_swap.BlockSwapper]:
    """Swap on the CPU, and keep each swapper the runs make."""
    made = []
    monkeypatch.setattr(builders, "load_models", freshly_allocated(builders.load_models))

    class Recorded(block_swap.BlockSwapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(block_swap, "swap_devices", lambda device: (torch.device("cpu"), torch.device("cpu")))
    monkeypatch.setattr(block_swap, "BlockSwapper", Recorded)
    return made


def train(script, argv: list, monkeypatch) -> None:
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert run(script.main, script.parse_args([str(a) for a in argv])) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def sd3_args(model: Path, data: Path, output: Path, *extra) -> list:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--seed", "0", "--max_sequence_length", "16", *extra]


def trained_file(output: Path, role: str, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        return load_file(output / "pytorch_lora_weights.safetensors")
    return load_file(output / role / "diffusion_pytorch_model.safetensors")


def assert_swapped_run_equal(script, make_args, flags: list, count: int, role: str, tmp_path, monkeypatch, swappers):
    lora = "--use_lora" in flags or "--rank" in flags
    train(script, make_args(tmp_path / "plain", *STEPS, *flags), monkeypatch)
    assert not swappers
    train(script, make_args(tmp_path / "swapped", *STEPS, *flags, "--blocks_to_swap", count), monkeypatch)
    [swapper] = swappers
    assert len(swapper.swapped) == count
    # Every step brings each swapped block in for its forward pass and again for its backward pass.
    assert swapper.copies_in >= 4 * 2 * count
    assert not swapper.resident, "every swapped block is back in host memory after the run"
    plain, swapped = trained_file(tmp_path / "plain", role, lora), trained_file(tmp_path / "swapped", role, lora)
    assert plain.keys() == swapped.keys()
    for key in plain:
        assert torch.equal(plain[key], swapped[key]), key


def test_sdxl_full_finetune_with_checkpointing_and_accumulation(tiny_sdxl, image_folder, tmp_path, monkeypatch,
                                                              swappers):
    flags = ["--gradient_checkpointing", "--gradient_accumulation_steps", "2"]
    assert_swapped_run_equal(sdxl_script, lambda out, *extra: sd_args(tiny_sdxl, image_folder, out, *extra), flags,
                             3, "unet", tmp_path, monkeypatch, swappers)


def test_sdxl_lora(tiny_sdxl, image_folder, tmp_path, monkeypatch, swappers):
    assert_swapped_run_equal(sdxl_script, lambda out, *extra: sd_args(tiny_sdxl, image_folder, out, *extra),
                             ["--use_lora", "--rank", "4"], 4, "unet", tmp_path, monkeypatch, swappers)


def test_sd3_full_finetune_with_fused_backward_pass(tiny_sd3, dog_images, tmp_path, monkeypatch, swappers):
    assert_swapped_run_equal(sd3_script, lambda out, *extra: sd3_args(tiny_sd3, dog_images, out, *extra),
                             ["--fused_backward_pass", "--optimizer", "adafactor"], 1, "transformer", tmp_path,
                             monkeypatch, swappers)


def test_sd3_lora_with_checkpointing(tiny_sd3, dog_images, tmp_path, monkeypatch, swappers):
    assert_swapped_run_equal(sd3_script, lambda out, *extra: sd3_args(tiny_sd3, dog_images, out, *extra),
                             ["--use_lora", "--rank", "4", "--gradient_checkpointing"], 2, "transformer", tmp_path,
                             monkeypatch, swappers)


def test_without_an_accelerator_the_flag_is_accepted_and_has_no_effect(tiny_sd3, caplog):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    with caplog.at_level(logging.WARNING, logger="sdft"):
        assert block_swap.install(transformer, 1, torch.device("cpu")) is None
    assert "--blocks_to_swap 1 has no effect" in caplog.text
