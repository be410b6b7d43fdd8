"""--full_bf16 reads the trained denoiser tensor by tensor (sdft/families/streamed_load.py): the
model must be the one diffusers' from_pretrained(torch_dtype=bfloat16) gives, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from sdft import tiny
from sdft.families import streamed_load
from sdft.families.sd3 import StableDiffusion3
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource

BF16 = torch.bfloat16


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return tiny._sdxl_unet(cross_attention_dim=32, pooled_dim=32)


def _transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


def _assert_same_model(streamed, reference):
    assert type(streamed) is type(reference)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert dict(streamed.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    for key, buffer in reference.named_buffers():
        assert torch.equal(dict(streamed.named_buffers())[key], buffer), key
    assert dict(streamed.config) == dict(reference.config)
    assert not streamed.training
    assert all(p.requires_grad and p.device.type == "cpu" for p in streamed.parameters())


@pytest.mark.parametrize("save", [{}, {"max_shard_size": "20KB"}, {"variant": "fp16"}],
                         ids=["one-file", "sharded", "fp16-variant"])
def test_streamed_unet_equals_from_pretrained_in_bf16(tmp_path, monkeypatch, save):
    model = _unet()
    if save.get("variant") == "fp16":
        model = model.half()
    model.save_pretrained(tmp_path / "unet", **save)
    # One tensor per open file: every reopen path is taken.
    monkeypatch.setattr(streamed_load, "CHUNK_BYTES", 1)
    read, read_cast = [], streamed_load._read_cast
    monkeypatch.setattr(streamed_load, "_read_cast", lambda file, dtype: read.append(file) or read_cast(file, dtype))
    source = ModelSource(str(tmp_path), variant=save.get("variant"), denoiser_dtype=BF16)
    streamed = StableDiffusionXL().load_denoiser(source)
    reference = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet", variant=save.get("variant"),
                                                     torch_dtype=BF16)
    assert next(streamed.parameters()).dtype == BF16
    _assert_same_model(streamed, reference)
    assert streamed.config._name_or_path == str(tmp_path)
    # Streamed, from the files from_pretrained reads (not its fallback)
    files = sorted(p.name for p in (tmp_path / "unet").glob("*.safetensors"))
    assert sorted(Path(file).name for file in read) == files
    assert (len(files) > 1) == ("max_shard_size" in save)
    assert all(("fp16" in name) == (save.get("variant") == "fp16") for name in files)


def test_streamed_sd3_transformer_equals_from_pretrained_in_bf16(tmp_path):
    _transformer().save_pretrained(tmp_path / "transformer")
    streamed = StableDiffusion3().load_denoiser(ModelSource(str(tmp_path), denoiser_dtype=BF16))
    reference = SD3Transformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer", torch_dtype=BF16)
    _assert_same_model(streamed, reference)


def test_bin_weights_and_fp32_training_fall_back_to_from_pretrained(tmp_path, monkeypatch):
    _unet().save_pretrained(tmp_path / "unet", safe_serialization=False)
    read = []
    monkeypatch.setattr(streamed_load, "_read_cast", lambda *a: read.append(a))
    streamed = StableDiffusionXL().load_denoiser(ModelSource(str(tmp_path), denoiser_dtype=BF16))
    _assert_same_model(streamed, UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet", torch_dtype=BF16))
    _unet().save_pretrained(tmp_path / "unet")
    fp32 = StableDiffusionXL().load_denoiser(ModelSource(str(tmp_path)))
    assert next(fp32.parameters()).dtype == torch.float32
    assert read == []


def test_a_missing_weight_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    _unet().save_pretrained(tmp_path / "unet")
    file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["conv_in.weight"]
    save_file(state, file)
    with pytest.raises(RuntimeError, match="conv_in.weight"):
        StableDiffusionXL().load_denoiser(ModelSource(str(tmp_path), denoiser_dtype=BF16))
