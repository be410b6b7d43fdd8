"""The objective-recipe flags of issue 21 on the command line: each bad value stops at parse time
with a message naming the flag, and the flags reach the objective the builders make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl
from sdft.builders import ddpm_objective, flow_objective
from sdft.errors import CliError


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    model = tmp_path / "base-model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "images").mkdir()
    return tmp_path


def base(script) -> list[str]:
    argv = ["--pretrained_model_name_or_path=base-model"]
    if script is sd3:
        return argv + ["--instance_data_dir=images", "--instance_prompt=a photo of sks dog"]
    return argv + ["--train_data_dir=images"]


def parse_error(script, extra: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        script.parse_args(base(script) + extra)
    assert exc.value.code == 2, f"expected a usage error for {extra}"
    return capsys.readouterr().err


ALL_SCRIPTS = [t2i, sdxl, sd3]
DDPM_SCRIPTS = [t2i, sdxl]


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("extra, flag", [
    (["--loss_type", "l3"], "--loss_type"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c"),
    (["--loss_type", "smooth_l1", "--huber_scale", "-1"], "--huber_scale"),
    (["--loss_type", "huber", "--huber_schedule", "linear"], "--huber_schedule"),
])
def test_loss_type_errors_name_the_flag(workdir, capsys, script, extra, flag):
    assert flag in parse_error(script, extra, capsys)


@pytest.mark.parametrize("script", DDPM_SCRIPTS, ids=["sd", "sdxl"])
@pytest.mark.parametrize("extra, flags", [
    (["--min_timestep", "-1"], ["--min_timestep"]),
    (["--min_timestep", "500", "--max_timestep", "500"], ["--min_timestep", "--max_timestep"]),
    (["--noise_offset_random_strength"], ["--noise_offset_random_strength", "--noise_offset"]),
    (["--adaptive_noise_scale", "0.01"], ["--adaptive_noise_scale", "--noise_offset"]),
    (["--multires_noise_iterations", "-2"], ["--multires_noise_iterations"]),
    (["--multires_noise_iterations", "6", "--multires_noise_discount", "0"], ["--multires_noise_discount"]),
    (["--ip_noise_gamma", "-0.1"], ["--ip_noise_gamma"]),
    (["--ip_noise_gamma_random_strength"], ["--ip_noise_gamma_random_strength"]),
])
def test_ddpm_recipe_errors_name_the_flag(workdir, capsys, script, extra, flags):
    err = parse_error(script, extra, capsys)
    assert all(flag in err for flag in flags), err


def test_ip_noise_gamma_and_input_perturbation_are_one_setting(workdir, capsys):
    err = parse_error(t2i, ["--ip_noise_gamma", "0.1", "--input_perturbation", "0.2"], capsys)
    assert "--ip_noise_gamma" in err and "--input_perturbation" in err
    assert t2i.parse_args(base(t2i) + ["--ip_noise_gamma", "0.1", "--input_perturbation", "0.1"]).ip_noise_gamma == 0.1


def test_timestep_bias_range_outside_the_window_is_refused(workdir, capsys):
    err = parse_error(sdxl, ["--timestep_bias_strategy", "range", "--timestep_bias_begin", "0", "--timestep_bias_end",
                             "100", "--timestep_bias_multiplier", "2", "--min_timestep", "200"], capsys)
    assert "--timestep_bias_begin" in err and "--min_timestep" in err


def test_timestep_bias_later_outside_the_window_is_refused_at_build_time(workdir):
    args = sdxl.parse_args(base(sdxl) + ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2",
                                         "--max_timestep", "500"])
    with pytest.raises(CliError, match="--timestep_bias_strategy later.*--min_timestep/--max_timestep"):
        ddpm_objective(args, DDPMScheduler(num_train_timesteps=1000), torch.device("cpu"))


@pytest.mark.parametrize("extra, flags", [
    (["--training_shift", "0"], ["--training_shift"]),
    (["--flow_shift", "-1"], ["--training_shift"]),
    (["--training_shift", "2", "--resolution_dependent_shift"], ["--training_shift", "resolution-dependent"]),
    (["--timestep_sampling", "beta"], ["--timestep_sampling"]),
])
def test_sd3_flow_errors_name_the_flag(workdir, capsys, extra, flags):
    err = parse_error(sd3, extra, capsys)
    assert all(flag in err for flag in flags), err


def test_the_ddpm_flags_reach_the_objective(workdir):
    args = sdxl.parse_args(base(sdxl) + [
        "--loss_type", "huber", "--huber_schedule", "exponential", "--huber_c", "0.2", "--huber_scale", "2",
        "--debiased_estimation_loss", "--multires_noise_iterations", "6", "--multires_noise_discount", "0.4",
        "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength", "--noise_offset", "0.05",
        "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01", "--min_timestep", "10",
        "--max_timestep", "900"])
    objective = ddpm_objective(args, DDPMScheduler(num_train_timesteps=1000), torch.device("cpu"))
    assert (objective.loss_type, objective.huber_schedule, objective.huber_c, objective.huber_scale) == \
        ("huber", "exponential", 0.2, 2.0)
    assert objective.debiased_estimation and objective.multires_noise_iterations == 6
    assert objective.multires_noise_discount == 0.4
    assert (objective.input_perturbation, objective.input_perturbation_random_strength) == (0.1, True)
    assert (objective.noise_offset, objective.noise_offset_random_strength, objective.adaptive_noise_scale) == \
        (0.05, True, 0.01)
    assert (objective.min_timestep, objective.max_timestep) == (10, 900)


def test_the_ddpm_defaults_build_the_objective_of_before(workdir):
    objective = ddpm_objective(t2i.parse_args(base(t2i)), DDPMScheduler(num_train_timesteps=1000), torch.device("cpu"))
    assert (objective.loss_type, objective.debiased_estimation, objective.multires_noise_iterations) == ("l2", False, 0)
    assert (objective.min_timestep, objective.max_timestep, objective.input_perturbation) == (None, None, 0.0)


@pytest.mark.parametrize("script, extra", [
    (t2i, []),
    (sdxl, ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "3", "--timestep_bias_portion", "0.5"]),
], ids=["sd-uniform", "sdxl-bias-later"])
def test_min_max_timestep_bounds_every_draw_from_the_cli(workdir, script, extra):
    args = script.parse_args(base(script) + ["--min_timestep", "200", "--max_timestep", "700", *extra])
    objective = ddpm_objective(args, DDPMScheduler(num_train_timesteps=1000), torch.device("cpu"))
    timesteps = objective.noise(torch.zeros(1000, 4, 2, 2), torch.Generator().manual_seed(0)).timesteps
    assert timesteps.shape == (1000,)
    assert int(timesteps.min()) >= 200 and int(timesteps.max()) <= 699
    # The whole window is used, not a corner of it.
    assert int(timesteps.min()) < 220 and int(timesteps.max()) > 680


def test_the_max_timestep_is_checked_against_the_scheduler(workdir):
    args = t2i.parse_args(base(t2i) + ["--max_timestep", "1001"])
    with pytest.raises(CliError, match="--max_timestep"):
        ddpm_objective(args, DDPMScheduler(num_train_timesteps=1000), torch.device("cpu"))


def test_training_shift_replaces_the_scheduler_shift(workdir):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    table = flow_objective(sd3.parse_args(base(sd3)), scheduler, torch.device("cpu"))
    assert torch.equal(table.scheduler_sigmas, scheduler.sigmas.float()) and table.shift is None
    unshifted = flow_objective(sd3.parse_args(base(sd3) + ["--flow_shift", "1"]), scheduler, torch.device("cpu"))
    grid = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    torch.testing.assert_close(unshifted.scheduler_sigmas, grid, atol=1e-6, rtol=0)
    torch.testing.assert_close(unshifted.scheduler_timesteps, grid * 1000, atol=1e-3, rtol=0)
    # --training_shift 3 on the table gives the scheduler's own table back, not 3 x 3.
    shifted = flow_objective(sd3.parse_args(base(sd3) + ["--training_shift", "3"]), scheduler, torch.device("cpu"))
    sigmas = shifted.noise(torch.zeros(4000, 16, 2, 2), torch.Generator().manual_seed(0)).sigmas.flatten()
    reference = flow_objective(sd3.parse_args(base(sd3)), scheduler, torch.device("cpu"))
    expected = reference.noise(torch.zeros(4000, 16, 2, 2), torch.Generator().manual_seed(0)).sigmas.flatten()
    torch.testing.assert_close(sigmas, expected, atol=1e-5, rtol=0)


def test_uniform_sampling_with_training_shift_from_the_cli(workdir):
    args = sd3.parse_args(base(sd3) + ["--timestep_sampling", "uniform", "--training_shift", "3"])
    objective = flow_objective(args, FlowMatchEulerDiscreteScheduler(shift=3.0), torch.device("cpu"))
    sigmas = objective.noise(torch.zeros(20000, 16, 2, 2), torch.Generator().manual_seed(0)).sigmas.flatten()
    # Shifted U(0, 1] by s = 3: P(sigma <= x) = x / (s - (s - 1) x), so the median is 0.75.
    assert abs(float(sigmas.median()) - 0.75) < 0.01
    assert (objective.timestep_sampling, objective.shift) == ("uniform", 3.0)


def test_resolution_dependent_shift_from_the_cli(workdir):
    args = sd3.parse_args(base(sd3) + ["--resolution_dependent_shift", "--timestep_sampling", "uniform"])
    objective = flow_objective(args, FlowMatchEulerDiscreteScheduler(shift=3.0), torch.device("cpu"))
    assert objective.resolution_shift is not None and objective.shift is None
    # 1024 px: 128 x 128 latents, 4096 patches of 2 x 2: the scheduler's max_shift 1.15.
    assert objective.resolution_shift.shift((128, 128)) == pytest.approx(2.718281828 ** 1.15)
