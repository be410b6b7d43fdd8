"""kohya's block numbering and --network_args syntax (sdft.adapter_blocks), on the real U-Net configs."""

from __future__ import annotations

import pytest

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.adapter_blocks import block_index, parse_network_args
from sdft.adapters import adaptable_layers
from tests.unit.test_adapters import BASE, sd15_unet, sdxl_unet


def test_block_numbers_follow_kohyas_lists_on_the_real_configs():
    """SD 1.5: 25 blocks, 0 (conv_in) never adapted; SDXL: 23, 0/1/22 (embeddings, conv_in, output) never."""
    sd15 = {block_index(name, "sd") for name in adaptable_layers(sd15_unet(), "full", None)}
    sdxl = {block_index(name, "sdxl") for name in adaptable_layers(sdxl_unet(), "full", None)}
    assert sd15 == set(range(1, 25)) and sdxl == set(range(2, 22))
    # kohya's names: SD 1.x down_blocks_1_attentions_0 -> 1 + 3 + 0; SDXL input_blocks_4 (down_blocks.1, first
    # pair) -> 5, middle_block_1 (the attention) -> 11, output_blocks_1 (B-LoRA's style block) -> 14.
    assert block_index("down_blocks.1.attentions.0.proj_in", "sd") == 4
    assert block_index("down_blocks.2.downsamplers.0.conv", "sd") == 9
    assert block_index("up_blocks.3.attentions.2.proj_out", "sd") == 24
    assert block_index("down_blocks.1.attentions.0.proj_in", "sdxl") == 5
    assert block_index("mid_block.attentions.0.proj_in", "sdxl") == 11
    assert block_index("up_blocks.0.attentions.1.proj_in", "sdxl") == 14


def test_lr_weight_curves_fill_and_threshold_as_kohya():
    settings = parse_network_args(["down_lr_weight=sine+.5", "mid_lr_weight=1.5", "up_lr_weight=0.05,,2",
                                   "block_lr_zero_threshold=0.1"], "sd")
    weights = settings.lr_weights
    assert len(weights) == 25 and weights[0] == pytest.approx(0.5) and weights[11] == pytest.approx(1.5)
    assert weights[12] == 1.5 and weights[13:16] == (0.0, 0.0, 2.0) and weights[16:] == (1.0,) * 9
    sdxl = parse_network_args(["block_preset=blora_style"], "sdxl").lr_weights
    assert [i for i, w in enumerate(sdxl) if w] == [14]


SD3 = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", ".", "--instance_prompt", "p"]


@pytest.mark.parametrize("script, base, extra, message", [
    (t2i, BASE, ["--network_args", "block_dims=4"], "--network_args block_dims needs 25 values"),
    (sdxl_script, BASE, ["--network_args", "block_dims=" + ",".join(["4"] * 25)], "block_dims needs 23 values"),
    (t2i, BASE, ["--network_args", "conv_dim=4"], "--network_args key 'conv_dim' is not one sdft knows"),
    (t2i, BASE, ["--network_args", "network_reg_dims=attn(=4"], "network_reg_dims: 'attn(' is not a regular"),
    (t2i, BASE, ["--network_args", "network_reg_lrs=attn2=fast"], "network_reg_lrs: 'fast' is not a number"),
    (t2i, BASE, ["--network_args", "up_lr_weight=wave"], "up_lr_weight: 'wave' is neither"),
    (t2i, BASE, ["--network_args", "block_preset=blora"], "block_preset 'blora' is not one of in, mid, out"),
    (t2i, BASE, ["--network_args", "conv_block_dims=" + ",".join(["2"] * 25)], "add --lora_type locon"),
    (t2i, BASE, ["--network_args", "block_alphas=" + ",".join(["2"] * 25)], "block_alphas needs block_dims"),
    (sd3_script, SD3, ["--network_args", "mid_lr_weight=2"], "mid_lr_weight counts U-Net blocks"),
])
def test_network_args_errors_name_the_key(script, base, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.parse_args([*base, "--use_lora", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_network_args_needs_use_lora(capsys):
    with pytest.raises(SystemExit):
        t2i.parse_args([*BASE, "--network_args", "block_preset=in"])
    assert "--network_args only applies to LoRA training" in capsys.readouterr().err
