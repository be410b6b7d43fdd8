"""--save_single_file's checkpoint, read by diffusers' `from_single_file` with the base model's
configs (the tiny models cannot be recognised from their weights alone, so `config=` names the
folder, as users do for fine-tunes of known bases), must generate what the diffusers folder does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from sdft.families.sd import StableDiffusion
from sdft.families.sd3 import StableDiffusion3
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.model_spec import describe_base, training_metadata
from sdft.output import export_pipeline, export_single_file
from sdft.single_file import SingleFileError, save_single_file
from sdft.tiny import build_sd, build_sd3, build_sdxl


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a blue background", num_inference_steps=1, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def perturb(*modules: torch.nn.Module) -> None:
    """Stand-in for training: every weight moves, so a component left out or mapped to the wrong
    place changes the image."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def sd3_base(path):
    """SD3 checkpoints keep CLIP-L without a learned projection, and diffusers' reader sets it to
    the identity; the tiny model is given the same."""
    base = build_sd3(path)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(base))
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    pipe.save_pretrained(str(base))
    return base


CASES = {
    "sd_v1": (StableDiffusion, build_sd, StableDiffusionPipeline, ["unet", "text_encoder"]),
    # SD 2.x stores its text encoder in the OpenCLIP layout; the tiny SD model stands in for it.
    "sd_v2": (StableDiffusion, build_sd, StableDiffusionPipeline, ["unet", "text_encoder"]),
    "sdxl_base_v1-0": (StableDiffusionXL, build_sdxl, StableDiffusionXLPipeline, ["unet", "text_encoder_2"]),
    "sd3": (StableDiffusion3, sd3_base, StableDiffusion3Pipeline, ["transformer", "text_encoder_2"]),
}


@pytest.mark.parametrize("layout", sorted(CASES))
def test_single_file_generates_what_the_diffusers_folder_does(tmp_path, layout):
    family_cls, build, pipeline_cls, trained_roles = CASES[layout]
    family = family_cls()
    base = build(tmp_path / "base")
    models = family.load(ModelSource(str(base)))
    trained = {role: getattr(models, role) for role in trained_roles}
    before = {role: {k: v.detach().clone() for k, v in module.named_parameters()} for role, module in trained.items()}
    perturb(*trained.values())
    out = tmp_path / "my-model"
    folder_pipe = export_pipeline(family, ModelSource(str(base)), trained, out, None)
    metadata = training_metadata(describe_base(family.name, dict(trained[family.denoiser_role].config), None),
                                 base_model=str(base), title=out.name, resolution=32, steps=2)
    path = export_single_file({**family.components(models), **trained}, out, layout, torch.float32, metadata)
    assert path == out / "my-model.safetensors"

    single = pipeline_cls.from_single_file(str(path), config=str(base), local_files_only=True)
    if layout == "sd3":
        single.text_encoder_3.eval()   # diffusers' single-file T5 loader leaves dropout on
    for role in trained:   # the file holds the trained weights, not the base model's
        loaded = getattr(single, role).state_dict()
        assert all(not torch.equal(loaded[k], before[role][k]) for k in before[role])
    np.testing.assert_allclose(generate(single), generate(folder_pipe), atol=1e-5)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == describe_base(
            family.name, dict(trained[family.denoiser_role].config), None).architecture
        assert handle.metadata()["modelspec.title"] == "my-model"


def test_save_precision_is_applied_and_keys_are_the_original_layout(tmp_path):
    family = StableDiffusionXL()
    models = family.load(ModelSource(str(build_sdxl(tmp_path / "base"))))
    path = save_single_file("sdxl_base_v1-0", family.components(models), tmp_path / "x.safetensors", torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    # What A1111/ComfyUI look for to recognise SDXL: both text encoders, original UNet/VAE names.
    for key in ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert key in keys, key


def test_a_layout_without_a_writer_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(SingleFileError, match="sd_v9"):
        save_single_file("sd_v9", {}, tmp_path / "x.safetensors", torch.float32)
    assert not (tmp_path / "x.safetensors").exists()


def test_learned_tokens_stay_out_of_the_checkpoint(tmp_path):
    """After textual inversion the text encoder has extra rows; the checkpoint keeps the base
    vocabulary that UIs expect (the new tokens are in the embeddings file)."""
    family = StableDiffusion()
    base = build_sd(tmp_path / "base")
    models = family.load(ModelSource(str(base)))
    vocab = models.text_encoder.get_input_embeddings().weight.shape[0]
    models.text_encoder.resize_token_embeddings(vocab + 2, mean_resizing=False)
    path = save_single_file("sd_v1", family.components(models), tmp_path / "ti.safetensors", torch.float32,
                            vocab_sizes={"text_encoder": vocab})
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(base), local_files_only=True)
    loaded = single.text_encoder.get_input_embeddings().weight
    assert loaded.shape[0] == vocab
    assert torch.equal(loaded, models.text_encoder.get_input_embeddings().weight[:vocab])
