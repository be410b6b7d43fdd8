"""The non-finite guard, the precision/device check and the parse-time checks of issue 12."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
from sdft.checkpointing import Position, resolve_resume
from sdft.errors import CliError
from sdft.guards import NonFiniteError, NonFiniteGuard, check_precision_device
from tests.unit.test_cli_errors import parse_error

NAN, FINE = torch.tensor(float("nan")), torch.tensor(0.5)


def guard(accelerator, tmp_path, budget=0, check_grad_norm=True, step=6):
    return NonFiniteGuard(accelerator, budget, Position(global_step=step), partial(resolve_resume, "latest", tmp_path),
                          check_grad_norm)


def test_a_nan_loss_stops_before_the_step_naming_it_and_the_last_checkpoint(accelerator, tmp_path):
    assert guard(accelerator, tmp_path).allows_step(FINE, torch.tensor(2.0), sync=True)
    with pytest.raises(NonFiniteError) as err:
        guard(accelerator, tmp_path).allows_step(NAN, None, sync=True)
    assert "Step 7" in str(err.value) and "No checkpoint" in str(err.value)
    assert "--learning_rate" in str(err.value) and "fp16" in str(err.value)
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(NonFiniteError, match="last good checkpoint is .*checkpoint-5"):
        guard(accelerator, tmp_path).allows_step(FINE, torch.tensor(float("inf")), sync=True)


def test_a_nan_in_an_earlier_micro_step_is_caught_at_the_sync_step(accelerator, tmp_path):
    watch = guard(accelerator, tmp_path)
    assert watch.allows_step(NAN, None, sync=False)       # accelerate's optimizer.step is a no-op here
    with pytest.raises(NonFiniteError, match="Step 7"):
        watch.allows_step(FINE, torch.tensor(1.0), sync=True)


def test_skip_nan_steps_skips_up_to_its_budget_and_counts_in_the_position(accelerator, tmp_path, caplog):
    watch = guard(accelerator, tmp_path, budget=2)
    assert not watch.allows_step(NAN, None, sync=True)
    assert watch.allows_step(FINE, None, sync=True), "a good step after a skipped one must apply"
    assert not watch.allows_step(FINE, torch.tensor(float("nan")), sync=True)
    assert watch.position.skipped_steps == 2 and "1 of --skip_nan_steps 2" in caplog.text
    with pytest.raises(NonFiniteError):
        watch.allows_step(NAN, None, sync=True)


def test_under_fp16_an_infinite_gradient_norm_is_left_to_the_grad_scaler(accelerator, tmp_path):
    assert guard(accelerator, tmp_path, check_grad_norm=False).allows_step(FINE, torch.tensor(float("inf")), True)


def test_fp16_on_the_cpu_is_refused_with_a_hint():
    with pytest.raises(CliError, match="needs a GPU.*bf16"):
        check_precision_device("fp16", torch.device("cpu"))
    check_precision_device("bf16", torch.device("cpu"))
    check_precision_device("fp16", torch.device("cuda"))


# --------------------------------------------------------------------------- parse time


@pytest.fixture()
def base(tmp_path, monkeypatch) -> list[str]:
    from sdft.tiny import make_images

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    for name in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        (model / name).mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "feature_extractor": [None, None]}
    (model / "model_index.json").write_text(json.dumps(index))
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={make_images(tmp_path / 'images', 2)}"]


@pytest.mark.parametrize("flag", ["--learning_rate=nan", "--learning_rate=inf", "--adam_beta1=nan",
                                  "--snr_gamma=nan", "--max_grad_norm=nan"])
def test_non_finite_floats_are_refused_naming_the_flag(base, flag, capsys):
    name = flag.split("=")[0]
    assert f"{name} must be a finite number" in parse_error(base + [flag], capsys)


def test_infinite_max_grad_norm_means_no_clipping_and_is_accepted(base):
    assert t2i.parse_args(base + ["--max_grad_norm=inf"]).max_grad_norm == float("inf")


def test_output_dir_that_is_a_file(base, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert "--output_dir" in parse_error(base + [f"--output_dir={tmp_path / 'taken'}"], capsys)
    assert "is a file" in parse_error(base + [f"--output_dir={tmp_path / 'taken' / 'below'}"], capsys)


def test_model_folder_without_its_unet_names_the_component(base, capsys):
    model = Path(base[0].split("=", 1)[1])
    t2i.parse_args(base)            # the unused safety_checker/ listed in model_index.json is not needed
    (model / "unet").rmdir()
    err = parse_error(base, capsys)
    assert "--pretrained_model_name_or_path" in err and "unet/" in err and "vae/" not in err


def test_sd3_folder_without_its_transformer_names_it(tmp_path, capsys):
    model = tmp_path / "sd3"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"],
                                                        "vae": ["diffusers", "AutoencoderKL"]}))
    (model / "vae").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    err = parse_error([f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={images}",
                       "--instance_prompt=a photo of sks dog", f"--output_dir={tmp_path / 'out'}"], capsys, script=sd3)
    assert "transformer/" in err


def test_negative_skip_nan_steps(base, capsys):
    assert "--skip_nan_steps" in parse_error(base + ["--skip_nan_steps=-1"], capsys)


def test_dreambooth_instance_folder_with_a_truncated_jpeg_names_it(tmp_path):
    from sdft.data.dreambooth import load_instance_images
    from sdft.data.sources import DataError
    from tests.integration.test_bad_inputs import truncated_jpeg

    folder = tmp_path / "instance"
    folder.mkdir()
    bad = truncated_jpeg(folder / "dog.jpg")
    with pytest.raises(DataError, match="dog.jpg.*(?i:truncated)"):
        load_instance_images(instance_data_dir=str(folder), dataset_name=None, dataset_config_name=None,
                             image_column="image", caption_column=None, instance_prompt="sks dog", cache_dir=None)
    assert bad.exists()
