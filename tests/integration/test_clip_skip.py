"""--clip_skip (issue 16), counted as kohya and A1111 count: 2 = the penultimate CLIP layer. The
conditioning the denoiser receives equals diffusers' pipeline conditioning with clip_skip=1, and
validation images are generated from it."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.families.sdxl import StableDiffusionXL
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh(fresh_accelerate_state):
    yield


class Recorder:
    """What the denoiser is called with, and what the validation pipeline is asked to generate from."""

    def __init__(self, monkeypatch, family_cls, pipeline_cls):
        self.conditions, self.captions, self.pipeline_calls = [], [], []
        predict, condition, call = family_cls.predict, family_cls.batch_condition, pipeline_cls.__call__

        def recorded_predict(family, denoiser, noisy, timesteps, cond):
            self.conditions.append(cond["encoder_hidden_states"].detach().clone())
            return predict(family, denoiser, noisy, timesteps, cond)

        def recorded_condition(family, text, batch, device):   # from the encoders or the text cache
            self.captions.append(list(batch["captions"]))
            return condition(family, text, batch, device)

        def recorded_call(pipeline, *args, **kwargs):
            self.pipeline_calls.append(kwargs)
            return call(pipeline, *args, **kwargs)

        monkeypatch.setattr(family_cls, "predict", recorded_predict)
        monkeypatch.setattr(family_cls, "batch_condition", recorded_condition)
        monkeypatch.setattr(pipeline_cls, "__call__", recorded_call)


def by_hand_sd(pipe, captions: list[str], clip_skip: int) -> torch.Tensor:
    """diffusers' SD encode_prompt(clip_skip=1) fails with transformers 5 ('CLIPTextModel' object has no
    attribute 'text_model'), so its computation is done here: the (clip_skip)-th layer from the end,
    through the final layer norm."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        norm = dict(pipe.text_encoder.named_modules())[
            "final_layer_norm" if "final_layer_norm" in dict(pipe.text_encoder.named_modules())
            else "text_model.final_layer_norm"]
        return F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def test_sd1_clip_skip_2_conditions_on_the_normed_penultimate_layer(tiny_sd, image_folder, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, StableDiffusion, StableDiffusionPipeline)
    out = tmp_path / "sd"
    argv = sd_args(tiny_sd, image_folder, out, "--max_train_steps", "1", "--report_to", "none", "--clip_skip", "2",
                   "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10", "--save_single_file",
                   "--validation_prompts", "a red circle", "--resolution", "32")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    expected = by_hand_sd(base, recorder.captions[0], 2)
    assert torch.allclose(recorder.conditions[0], expected, atol=1e-6)
    assert not torch.allclose(expected, by_hand_sd(base, recorder.captions[0], 1), atol=1e-3)   # it matters
    # validation (and the final images) use the same conditioning, given as embeddings
    final = recorder.pipeline_calls[-1]
    assert torch.allclose(final["prompt_embeds"], by_hand_sd(base, ["a red circle"], 2), atol=1e-6)
    with safe_open(str(out / "sd.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_clip_skip"] == "2"


def test_sdxl_clip_skip_2_equals_the_pipeline_with_diffusers_clip_skip_1(tiny_sdxl, image_folder, tmp_path,
                                                                         monkeypatch):
    recorder = Recorder(monkeypatch, StableDiffusionXL, StableDiffusionXLPipeline)
    out = tmp_path / "sdxl"
    argv = sd_args(tiny_sdxl, image_folder, out, "--max_train_steps", "1", "--report_to", "none",
                   "--clip_skip", "2", "--validation_prompt", "a red circle", "--num_validation_images", "1")
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    with torch.no_grad():
        expected = base.encode_prompt(recorder.captions[0], device="cpu", do_classifier_free_guidance=False,
                                      clip_skip=1)[0]
        default = base.encode_prompt(recorder.captions[0], device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.allclose(recorder.conditions[0], expected, atol=1e-6)
    assert not torch.allclose(expected, default, atol=1e-3)
    assert recorder.pipeline_calls and all(call["clip_skip"] == 1 for call in recorder.pipeline_calls)
    card = (out / "README.md").read_text()   # the card's usage snippet asks diffusers for the same layer
    assert re.search(r"image = pipe\(.*, clip_skip=1\)\.images\[0\]", card)


def test_clip_skip_out_of_range_is_refused(tiny_sd, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        t2i.parse_args([str(a) for a in sd_args(tiny_sd, image_folder, tmp_path / "o", "--clip_skip", "0")])
    assert "--clip_skip counts CLIP layers from the end" in capsys.readouterr().err


def test_sdxl_long_captions_train_and_validate_from_chunked_embeddings(tiny_sdxl, image_folder, tmp_path,
                                                                       monkeypatch):
    """--max_token_length 225: the denoiser and the validation pipeline see the same 3 x 77 states."""
    recorder = Recorder(monkeypatch, StableDiffusionXL, StableDiffusionXLPipeline)
    prompt = " ".join(["a red circle on a blue background"] * 20)
    argv = sd_args(tiny_sdxl, image_folder, tmp_path / "long", "--max_token_length", "225", "--clip_skip", "2",
                   "--max_train_steps", "1", "--report_to", "none", "--validation_prompt", prompt,
                   "--num_validation_images", "1")
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    assert recorder.conditions[0].shape[1] == 231
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    family = StableDiffusionXL(clip_skip=2, max_token_length=225)
    with torch.no_grad():
        expected = family.encode_text(base, [prompt], torch.device("cpu"))
    call = recorder.pipeline_calls[-1]
    assert torch.allclose(call["prompt_embeds"], expected["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(call["pooled_prompt_embeds"], expected["text_embeds"], atol=1e-6)
