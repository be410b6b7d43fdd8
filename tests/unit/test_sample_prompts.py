"""Prompt files in kohya's syntax (sdft.sample_prompts), sampler names (sdft.samplers) and the
sample cadence: parsed into plain objects, bad lines rejected at parse time with the file and line."""

from __future__ import annotations

import json

import diffusers
import pytest

from sdft import samplers
from sdft.errors import CliError
from sdft.sample_prompts import SamplePrompt, load, parse_line
from sdft.validation import SampleCadence, ValidationPlan

TXT = """# samples for the dog run
a photo of sks dog --n blurry, lowres --w 64 --h 32 --d 42 --l 6.5 --s 30 --ss dpm++ 2m karras

a painting of sks dog --ss euler_a
"""


def test_a_txt_file_gives_one_prompt_a_line_with_its_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(TXT)
    assert load(path) == [
        SamplePrompt("a photo of sks dog", negative_prompt="blurry, lowres", width=64, height=32, seed=42,
                     guidance_scale=6.5, steps=30, sampler="dpm++ 2m karras"),
        SamplePrompt("a painting of sks dog", sampler="euler_a"),
    ]


def test_toml_and_json_files_use_kohyas_keys(tmp_path):
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\nscale = 5.0\nsample_steps = 12\n\n'
                    '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "dark"\nseed = 3\n\n'
                    '[[prompt.subset]]\nprompt = "a dog"\nwidth = 32\nsample_sampler = "heun"\n')
    expected = [SamplePrompt("a cat", "dark", 64, 64, 3, 5.0, 12), SamplePrompt("a dog", None, 32, 64, None, 5.0, 12,
                                                                                 "heun")]
    assert load(toml) == expected
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps([{"prompt": "a cat", "negative_prompt": "dark", "width": 64, "height": 64, "seed": 3,
                               "scale": 5.0, "sample_steps": 12},
                              {"prompt": "a dog", "width": 32, "height": 64, "scale": 5.0, "sample_steps": 12,
                               "sample_sampler": "heun"}]))
    assert load(js) == expected


@pytest.mark.parametrize("text, message", [
    ("ok\na dog --x 3\n", "line 2: unknown option --x"),
    ("a dog --w 30\n", "line 1: width must be a positive multiple of 8 pixels, got 30"),
    ("\n\na dog --s many\n", "line 3: steps must be an integer, got 'many'"),
    ("a dog --s 0\n", "line 1: steps must be between 1 and 1000"),
    ("a dog --l -1\n", "line 1: the guidance scale must not be negative, got -1.0"),
    ("a dog --l high\n", "line 1: guidance_scale must be a number, got 'high'"),
    ("a dog --ss dpm++ 9m\n", "line 1: unknown sampler 'dpm++ 9m'"),
    ("a dog --d\n", "line 1: --d needs a value"),
    (" --n only a negative\n", "line 1: the prompt is empty"),
    ("# nothing but a comment\n", "holds no prompt"),
])
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(CliError) as err:
        load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_entries_of_toml_and_json_files_name_the_entry(tmp_path):
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "cfg": 3}]))
    with pytest.raises(CliError, match=r"entry 2: unknown key\(s\) cfg"):
        load(js)
    other = tmp_path / "p.yaml"
    other.write_text("prompt: a")
    with pytest.raises(CliError, match=r"must end in .txt, .toml or .json"):
        load(other)
    with pytest.raises(CliError, match="is not a file"):
        load(tmp_path / "missing.txt")


def test_sd3_files_take_flow_samplers_and_sizes_in_multiples_of_16(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a dog --ss heun --w 48\n")
    assert load(path, multiple=16, flow=True) == [SamplePrompt("a dog", width=48, sampler="heun")]
    path.write_text("a dog --ss dpm++ 2m\n")
    with pytest.raises(CliError, match="unknown flow-matching \\(SD3\\) sampler"):
        load(path, multiple=16, flow=True)
    path.write_text("a dog --w 40\n")
    with pytest.raises(CliError, match="multiple of 16"):
        load(path, multiple=16, flow=True)


def test_parse_line_keeps_dashes_inside_the_prompt():
    assert parse_line("a well-lit room--bright --n dark") == {"prompt": "a well-lit room--bright",
                                                             "negative_prompt": "dark"}


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name, cls, options", [
    ("dpmsolver++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("dpm++ 2m sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("k_euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    ("euler karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("ddim", "DDIMScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("dpm_2_a", "KDPM2AncestralDiscreteScheduler", {}),
    ("unipc", "UniPCMultistepScheduler", {}),
])
def test_samplers_are_the_diffusers_schedulers_the_ui_names_stand_for(name, cls, options):
    base = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, prediction_type="epsilon")
    scheduler = samplers.make_scheduler(name, base, prediction_type="v_prediction")
    assert type(scheduler).__name__ == cls
    # The model's own schedule is kept; the trained prediction type wins over the base config's.
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
    assert scheduler.config.prediction_type == "v_prediction"
    for key, value in options.items():
        assert scheduler.config[key] == value


def test_a_sampler_that_needs_a_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(samplers.importlib.util, "find_spec", lambda name: None)
    assert samplers.missing_package("k_lms") == "scipy"
    assert samplers.missing_package("euler") is None
    path = tmp_path / "p.txt"
    path.write_text("a dog --ss lms\n")
    with pytest.raises(CliError, match="line 1: sampler 'lms' needs scipy: pip install scipy"):
        load(path)


def test_flow_models_get_flow_samplers_with_their_shift():
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    heun = samplers.make_scheduler("heun", base, prediction_type=None)
    assert type(heun).__name__ == "FlowMatchHeunDiscreteScheduler" and heun.config.shift == 3.0
    assert type(samplers.make_scheduler("flow_euler", base)).__name__ == "FlowMatchEulerDiscreteScheduler"


# --------------------------------------------------------------------------- what a set holds, and when


def test_a_plan_gives_each_prompt_its_settings_and_seed():
    plan = ValidationPlan(["a cat", SamplePrompt("a dog", "dark", 64, 32, 7, 3.0, 9)], seed=100, resolution=48)
    assert plan.call_kwargs(0) == {"prompt": "a cat", "num_inference_steps": 25, "height": 48, "width": 48}
    assert plan.call_kwargs(1) == {"prompt": "a dog", "num_inference_steps": 9, "height": 32, "width": 64,
                                   "negative_prompt": "dark", "guidance_scale": 3.0}
    assert (plan.seed_of(0), plan.seed_of(1)) == (100, 7)
    assert plan.texts == ["a cat", "a dog"]
    # SD3 samples encode prompts with the T5 length used in training.
    sd3 = ValidationPlan(["a cat"], seed=0, pipeline_kwargs={"max_sequence_length": 77})
    assert sd3.call_kwargs(0)["max_sequence_length"] == 77


def test_cadence_steps_epochs_and_first():
    cadence = SampleCadence(every_n_steps=2, every_n_epochs=None, at_first=True)
    assert [s for s in range(7) if cadence.at_start(s) or cadence.after_step(s)] == [0, 2, 4, 6]
    assert not any(cadence.after_epoch(e) for e in range(3))
    by_epoch = SampleCadence(every_n_epochs=2)
    assert [e for e in range(5) if by_epoch.after_epoch(e)] == [0, 2, 4]
    assert not by_epoch.at_start(0) and not by_epoch.after_step(2)
