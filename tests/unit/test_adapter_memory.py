"""The memory estimate counts the adapters a LoRA run trains, for every type, target preset and rank layout."""

from __future__ import annotations

from functools import partial

import pytest
from diffusers import UNet2DConditionModel

from sdft import memory_estimate as me
from sdft.adapter_blocks import parse_network_args
from sdft.adapters import LoraSpec, add_adapter

ATTN = ["to_k", "to_q", "to_v", "to_out.0"]
SPECS = {
    "lora attn": LoraSpec(rank=4, denoiser_targets=ATTN),
    "locon full, conv rank 2": LoraSpec(rank=4, denoiser_targets=ATTN, adapter="locon", preset="full", conv_rank=2),
    "dora attn-mlp": LoraSpec(rank=4, denoiser_targets=ATTN, preset="attn-mlp", use_dora=True),
    "loha full": LoraSpec(rank=4, denoiser_targets=ATTN, adapter="loha", preset="full"),
    "lokr attn-mlp": LoraSpec(rank=4, denoiser_targets=ATTN, adapter="lokr", preset="attn-mlp", lokr_factor=4),
    "block ranks": LoraSpec(rank=4, denoiser_targets=ATTN, preset="attn-mlp", blocks=parse_network_args(
        ["network_reg_dims=attn2=8", "block_preset=out"], "sdxl")),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_adapter_count_on_the_meta_model_is_what_training_adds(name, tiny_sdxl):
    spec = SPECS[name]
    counted = me.adapter_stats(me.denoiser_model(str(tiny_sdxl), "unet"), partial(add_adapter, spec=spec,
                                                                                  is_denoiser=True))
    real = UNet2DConditionModel.from_pretrained(str(tiny_sdxl), subfolder="unet")
    real.requires_grad_(False)
    add_adapter(real, spec, is_denoiser=True)
    assert counted.count == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0


def test_lora_estimate_adds_the_adapters_fp32_weights_grads_state_and_ema():
    adapters = me.ParamStats.of_shapes([(16, 320), (320, 16)])
    frozen = me.ParamStats.of_shapes([(320, 320)])
    lines = me.estimate(frozen, me.TrainingSetup(lora=True, mixed_precision="bf16", ema=True, adapters=adapters))
    n = adapters.count
    assert {line.name: line.bytes for line in lines} == {
        "weights": 2 * 320 * 320, "adapters": 4 * n, "adapter grads": 4 * n, "adapter optim": 8 * n,
        "adapter EMA": 4 * n}
    eight_bit = me.estimate(frozen, me.TrainingSetup(lora=True, use_8bit_adam=True, adapters=adapters))
    assert {line.name: line.bytes for line in eight_bit}["adapter optim"] == 2 * n


def test_a_lora_run_prints_its_adapters_in_the_estimate(tiny_sdxl, caplog):
    """The estimate a LoRA run logs before loading counts the adapters its flags ask for."""
    import logging
    from types import SimpleNamespace

    import torch

    import train_text_to_image_sdxl as sdxl_script
    from sdft.builders import check_memory
    from sdft.families.sdxl import StableDiffusionXL

    args = sdxl_script.parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl), "--train_data_dir", ".",
                                   "--use_lora", "--lora_type", "locon", "--use_ema"])
    accelerator = SimpleNamespace(num_processes=1, mixed_precision="no", device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        check_memory(args, StableDiffusionXL(), accelerator)
    assert all(name in caplog.text for name in ("adapters", "adapter grads", "adapter optim",
                                                            "adapter EMA"))
