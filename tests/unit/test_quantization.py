"""Quantized frozen weights (sdft.quantization): the streamed loader gives the weights a whole-model
quantization gives, and the memory estimate counts what the quantized model and its adapters hold."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdft import memory_estimate as me
from sdft.families import streamed_load
from sdft.families.source import ModelSource
from sdft.quantization import FORMATS, is_quantized, quantize_linears
from sdft.tiny import _sd_unet


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters hold, a quantized weight's inner tensors (data and scales) included."""
    def size(tensor: torch.Tensor) -> int:
        if type(tensor) is torch.Tensor:
            return tensor.numel() * tensor.element_size()
        names, _ = tensor.__tensor_flatten__()
        return sum(size(getattr(tensor, name)) for name in names)
    return sum(size(param.data) for param in module.parameters())


def dense(weight: torch.Tensor) -> torch.Tensor:
    if not is_quantized(weight):
        return weight
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    _sd_unet().save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_quantized_load_equals_quantizing_the_loaded_model(fmt, unet_folder, monkeypatch):
    monkeypatch.setattr(streamed_load, "CHUNK_BYTES", 4096)   # many chunks, layers split across them
    source = ModelSource(str(unet_folder), denoiser_dtype=torch.bfloat16, denoiser_storage=fmt)
    streamed = streamed_load.load_denoiser(UNet2DConditionModel, source, "unet")
    whole = UNet2DConditionModel.from_pretrained(str(unet_folder), subfolder="unet", dtype=torch.bfloat16)
    assert quantize_linears(whole, fmt, torch.bfloat16)[0] > 0
    layers = dict(whole.named_modules())
    for name, layer in streamed.named_modules():
        if isinstance(layer, torch.nn.Linear):
            assert is_quantized(layer.weight) == is_quantized(layers[name].weight), name
            assert torch.equal(dense(layer.weight), dense(layers[name].weight)), name
    sample = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(1, 77, whole.config.cross_attention_dim, dtype=torch.bfloat16)
    assert torch.equal(streamed(sample, 10, context).sample, whole(sample, 10, context).sample)


@pytest.mark.parametrize("fmt", FORMATS)
def test_estimated_weights_match_the_bytes_the_quantized_model_holds(fmt):
    """SD-like widths (rows of 320 to 1280 values): the estimate is within 2% of the stored bytes."""
    model = torch.nn.Sequential(torch.nn.Linear(320, 1280), torch.nn.Linear(1280, 640), torch.nn.Conv2d(320, 320, 3),
                                torch.nn.GroupNorm(32, 320)).to(torch.bfloat16)
    stats = me.ParamStats.of_module(model)
    quantize_linears(model, fmt, torch.bfloat16)
    lines = me.estimate(stats, me.TrainingSetup(lora=True, mixed_precision="bf16", base_precision=fmt))
    assert lines[0].bytes == pytest.approx(stored_bytes(model), rel=0.02)
    bf16 = me.estimate(stats, me.TrainingSetup(lora=True, mixed_precision="bf16"))[0].bytes
    assert lines[0].bytes < bf16 * (0.65 if fmt == "nf4" else 0.75)


