"""Which layers each preset adapts, and the command lines the adapter flags refuse."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.adapter_files import KOHYA_WEIGHT_NAME, load_kohya, save_kohya
from sdft.adapters import LoraSpec, adaptable_layers, targets_for
from sdft.families.sd import StableDiffusion
from sdft.trainable import loraplus_groups, param_groups


def sd15_unet():
    with init_empty_weights():   # the SD 1.5 layout; no memory for the weights
        return UNet2DConditionModel(cross_attention_dim=768)


def sdxl_unet():
    with init_empty_weights():
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)


def clip(hidden: int, layers: int, projection: bool = False):
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, projection_dim=hidden)
    with init_empty_weights():
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def test_attn_mlp_adapts_the_layers_kohyas_lora_adapts_on_the_real_configs():
    """kohya's networks.lora logs 192 U-Net and 72 text-encoder modules for SD 1.5, and 722 U-Net and
    72 + 192 text-encoder modules for SDXL; `full` adds the ResNet and resampling layers."""
    sd15, sdxl = sd15_unet(), sdxl_unet()
    assert len(adaptable_layers(sd15, "attn-mlp", None)) == 192
    assert len(adaptable_layers(sdxl, "attn-mlp", None)) == 722
    assert len(adaptable_layers(clip(768, 12), "attn-mlp", None)) == 72
    assert len(adaptable_layers(clip(1280, 32, projection=True), "attn-mlp", None)) == 192
    assert len(adaptable_layers(sd15, "full", None)) == 278
    assert len(adaptable_layers(sdxl, "full", None)) == 788
    full = adaptable_layers(sd15, "full", None)
    assert "down_blocks.0.resnets.0.conv1" in full and "down_blocks.0.downsamplers.0.conv" in full
    assert "conv_in" not in full and "time_embedding.linear_1" not in full   # outside kohya's target blocks
    attn_mlp = adaptable_layers(sd15, "attn-mlp", None)
    assert "down_blocks.0.attentions.0.proj_in" in attn_mlp
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in attn_mlp
    assert not any("resnets" in name for name in attn_mlp)


def test_attn_is_the_familys_list_and_a_regex_picks_exact_layers():
    unet, family = sd15_unet(), StableDiffusion()
    spec = LoraSpec(rank=4, denoiser_targets=family.lora_target_modules)
    assert targets_for(unet, spec, is_denoiser=True) == ["to_k", "to_q", "to_v", "to_out.0"]
    regex = LoraSpec(rank=4, denoiser_targets=family.lora_target_modules, regex=r"^mid_block.*attn2\.to_(k|v)$")
    assert targets_for(unet, regex, is_denoiser=True) == [
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    with pytest.raises(ValueError, match="matches no Linear or Conv2d"):
        targets_for(unet, LoraSpec(rank=4, denoiser_targets=[], regex="no_such_layer"), is_denoiser=True)


BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


@pytest.mark.parametrize("script, extra, message", [
    (t2i, ["--lora_alpha", "1"], "--lora_alpha only applies to LoRA training"),
    (t2i, ["--use_lora", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    (t2i, ["--use_lora", "--lora_type", "loha", "--use_dora"], "--use_dora applies to --lora_type lora or locon"),
    (t2i, ["--use_lora", "--lora_type", "loha", "--use_dora"], "--use_dora applies to --lora_type lora or locon"),
    (t2i, ["--use_lora", "--rank_dropout", "0.1"], "--rank_dropout does not apply to --lora_type lora"),
    (t2i, ["--use_lora", "--lora_type", "lokr", "--lora_dropout", "0.1"], "--lora_dropout does not apply"),
    (t2i, ["--use_lora", "--lokr_factor", "4"], "--lokr_factor does not apply"),
    (t2i, ["--use_lora", "--lora_type", "locon", "--lora_targets", "attn"], "use --lora_targets full"),
    (sdxl_script, ["--use_lora", "--lora_target_regex", "attn("], "is not a regular expression"),
    (t2i, ["--use_lora", "--conv_rank", "0"], "--conv_rank must be at least 1"),
    (t2i, ["--use_lora", "--module_dropout", "1"], "--module_dropout must be at least 0 and below 1"),
])
def test_adapter_flags_refuse_what_cannot_work(script, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.parse_args([*BASE, *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sd3_takes_every_adapter_type_and_picks_layers_with_its_own_flags(tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path), "--instance_prompt", "p",
            "--use_lora"]
    for adapter in ("locon", "loha", "lokr"):
        assert sd3_script.parse_args([*argv, "--lora_type", adapter, "--output_kohya_format"]).lora_type == adapter
    with pytest.raises(SystemExit):   # SD3 picks its layers with --lora_layers/--lora_blocks
        sd3_script.parse_args([*argv, "--lora_targets", "full"])
    assert "unrecognized arguments: --lora_targets" in capsys.readouterr().err


def test_loraplus_splits_each_group_and_keeps_its_own_rate():
    """A text-encoder group with its own --text_encoder_lr keeps it; its B half is scaled from it."""
    unet = torch.nn.Sequential(torch.nn.Linear(4, 4))
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    trained = {}
    for role, module in (("unet", unet), ("text_encoder", encoder)):
        trained[role] = get_peft_model(module, LoraConfig(r=2, target_modules=["0"]))
    groups = loraplus_groups(param_groups(trained, "unet", text_encoder_lr=5e-4), trained, 16.0)
    assert [(g.get("lr"), g.get("lr_scale"), len(g["params"])) for g in groups] == [
        (None, None, 1), (None, 16.0, 1), (5e-4, None, 1), (5e-4, 16.0, 1)]
    b_params = {id(p) for m in trained.values() for n, p in m.named_parameters() if "lora_B" in n}
    assert {id(p) for g in groups if g.get("lr_scale") for p in g["params"]} == b_params


def test_dora_kohya_file_reads_back_into_fresh_adapters(tmp_path):
    """dora_scale holds m * ||W|| / ||W + delta|| (sdft.adapter_files); reading it back into fresh
    adapters restores peft's magnitude, for a Linear and a 3x3 Conv2d."""
    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Conv2d(3, 5, 3))
        config = LoraConfig(r=2, lora_alpha=1, target_modules=["0", "1"], use_dora=True)
        return inject_adapter_in_model(config, net)

    trained, fresh = model(), model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    save_kohya(tmp_path, {"unet": trained}, {})
    assert load_file(str(tmp_path / KOHYA_WEIGHT_NAME))["lora_unet_1.dora_scale"].shape == (5, 1, 1, 1)
    load_kohya(tmp_path / KOHYA_WEIGHT_NAME, {"unet": fresh}, {})
    for (name, a), (_, b) in zip(trained.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
