"""Golden numbers: a 5-step tiny run of each script reproduces the per-step losses, held-out
losses and a checksum of the saved weights recorded in tests/data/golden/, bit for bit.

A move of code must change none of them. A change that is meant to change the numbers records
them anew, and says why in its commit: `SDFT_RECORD_GOLDEN=1 pytest tests/integration/test_golden.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from accelerate import Accelerator
from safetensors.torch import load_file

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.tiny import build_sd3, make_images
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
RECORD = os.environ.get("SDFT_RECORD_GOLDEN") == "1"
STEPS = ["--max_train_steps", "5", "--checkpointing_steps", "100", "--report_to", "none"]


@pytest.fixture(autouse=True)
def _one_thread(fresh_accelerate_state, one_thread):
    """Reductions must not depend on how many threads the worker has."""


class LoggedLosses:
    """Every `train_loss` and `val_loss` the run hands to `Accelerator.log`, in order."""

    def __init__(self, monkeypatch):
        self.values: list[list] = []
        original = Accelerator.log

        def log(accelerator, values, step=None, log_kwargs=None):
            for key in ("train_loss", "val_loss"):
                if key in values:
                    self.values.append([key, step, values[key]])
            return original(accelerator, values, step=step, log_kwargs=log_kwargs or {})

        monkeypatch.setattr(Accelerator, "log", log)


def weights_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        tensors = load_file(file)
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_golden(name: str, script, argv: list, weights: list[str], output: Path, monkeypatch) -> None:
    losses = LoggedLosses(monkeypatch)
    assert run(script.main, script.parse_args([str(a) for a in argv])) == 0
    found = {"losses": losses.values, "weights": weights_digest([output / w for w in weights])}
    golden = GOLDEN / f"{name}.json"
    if RECORD:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(found, indent=1) + "\n")
    expected = json.loads(golden.read_text())
    assert [key for key, _, _ in found["losses"]].count("train_loss") == 5
    assert found["losses"] == expected["losses"]
    assert found["weights"] == expected["weights"]


def test_sd_full_finetune_with_ema_latent_cache_and_held_out_loss(tiny_sd, image_folder, tmp_path, monkeypatch):
    output = tmp_path / "sd"
    argv = sd_args(tiny_sd, image_folder, output, *STEPS, "--use_ema", "--cache_latents", "--validation_split",
                   "0.25", "--validate_every_n_steps", "2", "--snr_gamma", "5", "--noise_offset", "0.05")
    check_golden("sd", t2i, argv, ["unet/diffusion_pytorch_model.safetensors"], output, monkeypatch)


def test_sdxl_lora_with_text_cache_and_held_out_loss(tiny_sdxl, image_folder, tmp_path, monkeypatch):
    output = tmp_path / "sdxl"
    argv = sd_args(tiny_sdxl, image_folder, output, *STEPS, "--use_lora", "--rank", "4", "--cache_latents",
                   "--cache_text_encoder_outputs", "--validation_split", "0.25", "--validate_every_n_steps", "2",
                   "--proportion_empty_prompts", "0.2")
    check_golden("sdxl", sdxl_script, argv, ["pytorch_lora_weights.safetensors"], output, monkeypatch)


def test_sd3_lora_dreambooth_with_caches_and_held_out_loss(tmp_path_factory, tmp_path, monkeypatch):
    model = build_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")
    images = make_images(tmp_path_factory.mktemp("data") / "dog", num_images=4, layout="images")
    output = tmp_path / "sd3"
    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--max_sequence_length", "16",
            *STEPS, "--use_lora", "--rank", "4", "--cache_latents", "--validation_split", "0.25",
            "--validate_every_n_steps", "2"]
    check_golden("sd3", sd3_script, argv, ["pytorch_lora_weights.safetensors"], output, monkeypatch)
