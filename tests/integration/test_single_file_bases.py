"""Single-file bases (issue 16): a `.safetensors` / `.ckpt` checkpoint in the original layout trains
with each script, is converted once, and a run that changes nothing exports the same file.

The input files are written by `sdft.single_file` (a converter from the published key maps, checked
at write time against diffusers' own converters) and read by diffusers' `from_single_file`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft import file_digest
from sdft.builders import ddpm_objective
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.families.sd3 import StableDiffusion3
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.single_file import save_single_file
from sdft.tiny import build_sd3, make_images
from tests.integration.conftest import generate, sd_args

pytestmark = pytest.mark.integration
real_sha256 = file_digest.sha256_of
# One step whose learning rate is 0 (the first step of a warm-up): everything runs, no weight moves.
ONE_STEP_NO_CHANGE = ["--max_train_steps", "1", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10",
                      "--report_to", "none", "--save_single_file", "--save_precision", "fp32"]


@pytest.fixture(autouse=True)
def _fresh(fresh_accelerate_state):
    yield


def write_single_file(family, folder: Path, layout: str, path: Path, drop: str | None = None,
                      markers: tuple[str, ...] = ()) -> Path:
    models = family.load(ModelSource(str(folder)))
    save_single_file(layout, family.components(models), path, torch.float32, markers=markers)
    if drop is not None:   # a file without one component, as SD3 files without T5 are published
        tensors = {k: v for k, v in load_file(path).items() if not k.startswith(drop)}
        save_file(tensors, str(path))
    return path


def sd3_base(path: Path) -> Path:
    """SD3 files keep CLIP-L without a learned projection (diffusers reads it as the identity)."""
    base = build_sd3(path)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(base))
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    pipe.save_pretrained(str(base))
    return base


class Conversions:
    """Counts the pipelines built by diffusers' single-file loader during a run."""

    def __init__(self, monkeypatch, pipeline_cls):
        self.count = 0
        original = pipeline_cls.from_single_file.__func__

        def counted(cls, *args, **kwargs):
            self.count += 1
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(pipeline_cls, "from_single_file", classmethod(counted))


def assert_same_tensors(written: Path, original: Path) -> None:
    read, expected = load_file(written), load_file(original)
    assert sorted(read) == sorted(expected)
    assert all(torch.equal(read[k], expected[k]) for k in expected)


def test_sd1_single_file_full_run_converts_once_and_exports_the_same_file(tiny_sd, image_folder, tmp_path,
                                                                           monkeypatch, caplog):
    base = write_single_file(StableDiffusion(), tiny_sd, "sd_v1", tmp_path / "merged.safetensors")
    conversions = Conversions(monkeypatch, StableDiffusionPipeline)
    hashed = []
    monkeypatch.setattr(file_digest, "sha256_of", lambda path: hashed.append(path) or real_sha256(path))
    cache = tmp_path / "hf-cache"
    for name in ("first", "second"):
        out = tmp_path / name
        argv = sd_args(base, image_folder, out, *ONE_STEP_NO_CHANGE, "--single_file_config", tiny_sd,
                       "--cache_dir", cache)
        with caplog.at_level(logging.INFO, logger="sdft"):
            assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
        assert_same_tensors(out / f"{name}.safetensors", base)
    assert conversions.count == 1 and len(hashed) == 1   # the second run neither converts nor reads the file
    assert "using the converted folder" in caplog.text
    assert len([p for p in (cache / "sdft-single-file" / "single_file").iterdir() if p.is_dir()]) == 1
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "second"), safety_checker=None)
    assert generate(pipe).shape == (32, 32, 3)


def test_sd1_ckpt_lora_loads_on_the_single_file_base(tiny_sd, image_folder, tmp_path):
    safetensors_file = write_single_file(StableDiffusion(), tiny_sd, "sd_v1", tmp_path / "merged.safetensors")
    ckpt = tmp_path / "merged.ckpt"
    torch.save({"state_dict": load_file(safetensors_file)}, ckpt)
    out = tmp_path / "lora"
    argv = sd_args(ckpt, image_folder, out, "--max_train_steps", "2", "--report_to", "none", "--use_lora",
                   "--rank", "4", "--single_file_config", tiny_sd)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_sd), local_files_only=True,
                                                    safety_checker=None)
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.equal(torch.from_numpy(generate(pipe)), torch.from_numpy(before))


def test_vpred_ztsnr_sdxl_file_trains_as_marked_and_exports_the_same_file(tiny_sdxl, image_folder, tmp_path,
                                                                         monkeypatch, caplog):
    """NoobAI-style base: v_pred and ztsnr marker keys select v-prediction and zero-terminal-SNR betas
    without flags, and the run's single file carries the markers back."""
    base = write_single_file(StableDiffusionXL(), tiny_sdxl, "sdxl_base_v1-0", tmp_path / "noob.safetensors",
                             markers=("v_pred", "ztsnr"))
    objectives = []

    def recorded(*args, **kwargs):
        objectives.append(ddpm_objective(*args, **kwargs))
        return objectives[-1]

    monkeypatch.setattr(sdxl_script, "ddpm_objective", recorded)
    out = tmp_path / "sdxl"
    argv = sd_args(base, image_folder, out, *ONE_STEP_NO_CHANGE, "--single_file_config", tiny_sdxl)
    with caplog.at_level(logging.INFO, logger="sdft"):
        assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    assert "detected v-prediction with zero terminal SNR" in caplog.text
    assert objectives[0].prediction_type == "v_prediction"
    assert objectives[0].alphas_cumprod[-1] == 0   # rescaled betas: the last timestep is pure noise
    assert_same_tensors(out / "sdxl.safetensors", base)   # markers included
    with safe_open(str(out / "sdxl.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_zero_terminal_snr"] == "True"
    folder = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert folder.scheduler.config.prediction_type == "v_prediction"
    assert folder.scheduler.config.rescale_betas_zero_snr and folder.scheduler.config.timestep_spacing == "trailing"
    pipe = StableDiffusionXLPipeline.from_single_file(str(out / "sdxl.safetensors"), config=str(tiny_sdxl),
                                                      local_files_only=True)
    assert generate(pipe).shape == (32, 32, 3)


def test_sd3_single_file_without_t5_takes_it_from_the_config(tmp_path, caplog):
    config = sd3_base(tmp_path / "sd3-config")
    base = write_single_file(StableDiffusion3(), config, "sd3", tmp_path / "sd3.safetensors",
                             drop="text_encoders.t5xxl.")
    images = make_images(tmp_path / "dog", num_images=2, layout="images")
    out = tmp_path / "sd3-out"
    argv = ["--pretrained_model_name_or_path", base, "--single_file_config", config, "--instance_data_dir", images,
            "--output_dir", out, "--instance_prompt", "a photo of sks dog", "--resolution", "32",
            "--train_batch_size", "1", "--seed", "0", "--max_sequence_length", "16",
            *ONE_STEP_NO_CHANGE]
    with caplog.at_level(logging.INFO, logger="sdft"):
        assert run(sd3_script.main, sd3_script.parse_args([str(a) for a in argv])) == 0
    assert "has no text_encoder_3; taken from the config source" in caplog.text
    written, given = load_file(out / "sd3-out.safetensors"), load_file(base)
    assert all(torch.equal(written[k], given[k]) for k in given)
    assert any(k.startswith("text_encoders.t5xxl.") for k in written)   # the exported file is complete


class NotATensor:
    """A pickled object the weights-only unpickler refuses."""


def parse_error(script, argv: list, capsys) -> str:
    with pytest.raises(SystemExit):
        script.parse_args([str(a) for a in argv])
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def sd1_file(tiny_sd, tmp_path_factory) -> Path:
    return write_single_file(StableDiffusion(), tiny_sd, "sd_v1", tmp_path_factory.mktemp("files") / "sd1.safetensors")


def test_bad_single_files_are_named_at_parse_time(sd1_file, tiny_sd, tiny_sdxl, image_folder, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def error(script, model: Path, *extra) -> str:
        return parse_error(script, sd_args(model, image_folder, tmp_path / "out", *extra), capsys)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    assert f"'{truncated}' is not a readable .safetensors file (truncated" in error(t2i, truncated)

    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("these are not weights")
    assert f"'{not_a_checkpoint}' is not a PyTorch checkpoint" in error(t2i, not_a_checkpoint)

    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"x": NotATensor()}}, code)
    assert f"'{code}' needs more than tensors to unpickle" in error(t2i, code)

    assert f"'{sd1_file}' is a Stable Diffusion 1.x checkpoint; train it with train_text_to_image.py" in error(
        sdxl_script, sd1_file, "--single_file_config", tiny_sdxl)
    sdxl_file = write_single_file(StableDiffusionXL(), tiny_sdxl, "sdxl_base_v1-0", tmp_path / "xl.safetensors")
    assert "is a SDXL checkpoint; train it with train_text_to_image_sdxl.py, not train_text_to_image.py" in error(
        t2i, sdxl_file, "--single_file_config", tiny_sd)

    assert "give --single_file_config" in error(t2i, sd1_file)
    assert "--single_file_config gives the configs of a single-file" in error(t2i, tiny_sd, "--single_file_config",
                                                                               tiny_sd)


def test_zero_terminal_snr_with_epsilon_is_refused_at_parse_time(tiny_sd, image_folder, tmp_path, capsys):
    base = sd_args(tiny_sd, image_folder, tmp_path / "out", "--zero_terminal_snr")
    assert "Zero terminal SNR (--zero_terminal_snr) needs v-prediction" in parse_error(t2i, base, capsys)
    assert "needs v-prediction" in parse_error(t2i, [*base, "--prediction_type", "epsilon"], capsys)
    assert t2i.parse_args([str(a) for a in base] + ["--prediction_type", "v_prediction"]).zero_terminal_snr


def test_zero_terminal_snr_flag_trains_and_exports_rescaled_betas(tiny_sd, image_folder, tmp_path, monkeypatch):
    objectives = []

    def recorded(*args, **kwargs):
        objectives.append(ddpm_objective(*args, **kwargs))
        return objectives[-1]

    monkeypatch.setattr(t2i, "ddpm_objective", recorded)
    out = tmp_path / "ztsnr"
    argv = sd_args(tiny_sd, image_folder, out, "--max_train_steps", "1", "--report_to", "none", "--zero_terminal_snr",
                   "--prediction_type", "v_prediction", "--save_single_file")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    assert objectives[0].alphas_cumprod[-1] == 0 and objectives[0].prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.prediction_type == "v_prediction"
    assert generate(pipe).shape == (32, 32, 3)
    with safe_open(str(out / "ztsnr.safetensors"), "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())


def test_sdxl_lora_trained_on_a_single_file_loads_on_that_file(tiny_sdxl, image_folder, tmp_path):
    base = write_single_file(StableDiffusionXL(), tiny_sdxl, "sdxl_base_v1-0", tmp_path / "pony.safetensors")
    out = tmp_path / "lora"
    train_argv = sd_args(base, image_folder, out, "--max_train_steps", "2", "--report_to", "none", "--use_lora",
                         "--rank", "4", "--train_text_encoder", "--single_file_config", tiny_sdxl)
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in train_argv])) == 0
    pipe = StableDiffusionXLPipeline.from_single_file(str(base), config=str(tiny_sdxl), local_files_only=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.equal(torch.from_numpy(generate(pipe)), torch.from_numpy(before))


def merged_by_hand(transformer: torch.nn.Module, lora_file: Path, scale: float) -> None:
    """W += scale * B @ A for each adapted linear, read straight from the LoRA file (no loader of ours
    or diffusers' involved): the trained adapter merged."""
    lora = load_file(lora_file)
    modules = dict(transformer.named_modules())
    downs = [k for k in lora if k.endswith(".lora_A.weight")]
    assert downs
    with torch.no_grad():
        for down in downs:
            name = down.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = lora[down.replace(".lora_A.", ".lora_B.")]
            modules[name].weight += scale * (up @ lora[down])


def test_sd3_lora_trained_on_a_single_file_loads_on_that_file_as_merged(tmp_path):
    config = sd3_base(tmp_path / "sd3-config")
    base = write_single_file(StableDiffusion3(), config, "sd3", tmp_path / "sd35.safetensors")
    images = make_images(tmp_path / "dog", num_images=2, layout="images")
    out = tmp_path / "sd3-lora"
    argv = ["--pretrained_model_name_or_path", base, "--single_file_config", config, "--instance_data_dir", images,
            "--output_dir", out, "--instance_prompt", "a photo of sks dog", "--resolution", "32",
            "--train_batch_size", "1", "--seed", "0", "--max_sequence_length", "16", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--use_lora", "--rank", "4", "--report_to", "none"]
    assert run(sd3_script.main, sd3_script.parse_args([str(a) for a in argv])) == 0

    def single_file_pipeline():
        pipe = StableDiffusion3Pipeline.from_single_file(str(base), config=str(config), local_files_only=True)
        pipe.text_encoder_3.eval()   # diffusers 0.42 leaves a single file's T5 in train mode (dropout on)
        return pipe

    loaded = single_file_pipeline()
    before = generate(loaded, max_sequence_length=16)
    loaded.load_lora_weights(str(out))
    with_lora = generate(loaded, max_sequence_length=16)
    merged = single_file_pipeline()
    merged_by_hand(merged.transformer, out / "pytorch_lora_weights.safetensors", scale=1.0)  # alpha = rank
    assert not np.allclose(with_lora, before, atol=1e-3)
    np.testing.assert_allclose(with_lora, generate(merged, max_sequence_length=16), atol=1e-5)
