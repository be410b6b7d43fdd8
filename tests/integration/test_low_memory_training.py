"""Full fine-tuning in less memory, through the real entry point in-process on the tiny SD model:
Adafactor with the fused backward pass trains the same weights as without it, a resumed run with
bf16 weights and stochastic rounding equals an uninterrupted one, and a run whose memory estimate
exceeds the device stops before any weight is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft import memory_estimate
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration

LOW_MEMORY = ["--optimizer", "adafactor", "--fused_backward_pass"]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(argv: list, monkeypatch) -> int:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        return run(t2i.main, t2i.parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate()


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_adafactor_with_fused_backward_pass_trains_the_same_weights(tiny_sd, image_folder, tmp_path, monkeypatch):
    common = ["--max_train_steps", "3", "--checkpointing_steps", "10", "--optimizer", "adafactor", "--train_batch_size", "1",
              "--mixed_precision", "no", "--max_grad_norm", "1000"]
    assert train(sd_args(tiny_sd, image_folder, tmp_path / "plain", *common), monkeypatch) == 0
    fused_common = [a for a in common if a not in ("--max_grad_norm", "1000")]  # clipping is refused with it
    assert train(sd_args(tiny_sd, image_folder, tmp_path / "fused", *fused_common, "--fused_backward_pass"),
                 monkeypatch) == 0
    plain, fused = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "fused")
    base = unet_weights(tiny_sd)
    assert plain.keys() == fused.keys()
    assert any(not torch.equal(plain[k], base[k]) for k in base), "training moved the weights"
    for key in plain:
        assert plain[key].dtype == torch.float32
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_resume_with_bf16_weights_and_fused_adafactor_equals_an_uninterrupted_run(tiny_sd, image_folder, tmp_path,
                                                                                   monkeypatch):
    flags = [*LOW_MEMORY, "--full_bf16", "--mixed_precision", "bf16", "--use_ema", "--max_train_steps", "4",
             "--checkpointing_steps", "2", "--learning_rate", "1e-4", "--train_batch_size", "1"]
    whole = tmp_path / "whole"
    assert train(sd_args(tiny_sd, image_folder, whole, *flags), monkeypatch) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert train(sd_args(tiny_sd, image_folder, resumed, *flags, "--resume_from_checkpoint", "latest"),
                 monkeypatch) == 0

    trained_whole, trained_resumed = unet_weights(whole / "checkpoint-4"), unet_weights(resumed / "checkpoint-4")
    assert all(t.dtype == torch.bfloat16 for t in trained_whole.values())
    step2 = unet_weights(whole / "checkpoint-2")
    assert any(not torch.equal(trained_whole[k], step2[k]) for k in step2), "steps 3-4 moved the weights"
    for key in trained_whole:
        assert torch.equal(trained_whole[key], trained_resumed[key]), key
    final_whole, final_resumed = unet_weights(whole), unet_weights(resumed)  # the EMA weights
    for key in final_whole:
        assert torch.equal(final_whole[key], final_resumed[key]), key


def test_a_run_that_cannot_fit_stops_before_loading_with_the_arithmetic(tiny_sd, image_folder, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(memory_estimate, "device_memory", lambda device: (10 * 2**20, "memory on Test GPU"))
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusion, "load", lambda self, source: pytest.fail("models were loaded"))
        code = train(sd_args(tiny_sd, image_folder, out, "--max_train_steps", "1"), monkeypatch)
    err = capsys.readouterr().err
    assert code == 1
    assert "Memory estimate for training the unet" in err and "AdamW: two fp32 moments" in err
    assert "does not fit the 10.0 MiB of memory on Test GPU" in err and "--skip_memory_check" in err
    # Beside the trained UNet (issue 26): the frozen parts at their dtype, the caption cache, the libraries.
    for line in ("text encoder ", "vae ", "frozen, fp32", "text cache ", "captions x", "libraries "):
        assert line in err, line
    assert not out.exists()

    assert train(sd_args(tiny_sd, image_folder, out, "--max_train_steps", "1", "--skip_memory_check"),
                 monkeypatch) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
