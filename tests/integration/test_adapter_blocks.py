"""Per-block and per-regex adapter ranks and learning rates (kohya's --network_args), trained by the scripts."""

from __future__ import annotations

import json

import pytest
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import sdft.trainer
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.adapter_files import KOHYA_WEIGHT_NAME
from sdft.cli import run
from tests.integration.conftest import sd_args
from tests.integration.test_adapter_runs import STEPS, merged_at_finish  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
# SD 1.x's 25 kohya blocks: 0 none, 1-11 down (3 per diffusers down block), 12 mid, 13-24 up.
BLOCK_DIMS = [0, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4]
BLOCK_ALPHAS = [float(i) / 2 for i in range(25)]
CONV_DIMS = [1] * 25


@pytest.fixture()
def optimizer_groups(monkeypatch):
    """(name, lr, parameter names) of each optimizer group when the loop starts."""
    seen = []
    train = sdft.trainer.train

    def capture(run_):
        names = {id(p): f"{role}.{n}" for role, m in run_.trained.modules.items() for n, p in m.named_parameters()}
        seen.extend((g["name"], g["lr"], {names[id(p)] for p in g["params"]})
                    for g in run_.optimizer.optimizer.param_groups)
        return train(run_)

    monkeypatch.setattr(sdft.trainer, "train", capture)
    return seen


def ranks_and_alphas(path) -> dict[str, tuple[int, float]]:
    state = load_file(str(path))
    return {k.split(".")[0]: (v.shape[0], float(state[k.split(".")[0] + ".alpha"])) for k, v in state.items()
            if k.endswith("lora_down.weight")}


def test_block_ranks_alphas_and_rates_reach_layers_groups_and_files(tiny_sd, image_folder, tmp_path,
                                                                      optimizer_groups, merged_at_finish):  # noqa: F811
    output = tmp_path / "out"
    network_args = [f"block_dims={','.join(map(str, BLOCK_DIMS))}", f"block_alphas={','.join(map(str, BLOCK_ALPHAS))}",
                    f"conv_block_dims={','.join(map(str, CONV_DIMS))}", "network_reg_dims=attn2\\.to_q=1",
                    "down_lr_weight=0.5,0.5", "mid_lr_weight=0", "up_lr_weight=2",
                    "network_reg_lrs=lora_te_text_model_encoder_layers_0_=3e-3"]
    argv = sd_args(tiny_sd, image_folder, output, *STEPS, "--use_lora", "--lora_targets", "full",
                   "--train_text_encoder", "--output_kohya_format", "--network_args", *network_args)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0

    found = ranks_and_alphas(output / KOHYA_WEIGHT_NAME)
    assert found["lora_unet_down_blocks_0_attentions_0_proj_in"] == (2, 0.5)                 # block 1
    assert found["lora_unet_down_blocks_1_resnets_0_conv1"] == (1, 1.0)                       # block 4, conv: alpha = rank
    assert found["lora_unet_down_blocks_1_resnets_0_time_emb_proj"] == (BLOCK_DIMS[4], 2.0)
    assert found["lora_unet_up_blocks_1_attentions_1_proj_out"] == (BLOCK_DIMS[17], 8.5)      # block 17
    assert found["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"] == (1, 8.0)   # the regex
    assert found["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (4, 4.0)          # --rank, alpha = rank
    assert not any(name.startswith("lora_unet_mid_block") for name in found)                  # multiplier 0: none
    with safe_open(str(output / KOHYA_WEIGHT_NAME), framework="pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"])["block_dims"] == ",".join(map(str, BLOCK_DIMS))

    groups = {name: (lr, params) for name, lr, params in optimizer_groups}
    assert groups["unet_block1"][0] == pytest.approx(5e-3) and groups["unet_block13"][0] == pytest.approx(2e-2)
    assert groups["unet_block4"][0] == groups["unet_block17"][0] == pytest.approx(1e-2)   # short lists: 1 after
    assert {p.split(".")[2:5] == ["0", "attentions", "0"] for p in groups["unet_block1"][1]} == {True, False}
    assert all(".down_blocks.0.attentions.0." in p or ".down_blocks.0.resnets.0." in p for p in groups["unet_block1"][1])
    assert groups["text_encoders_reg0"][0] == pytest.approx(3e-3) and groups["text_encoders"][0] == pytest.approx(1e-2)
    assert all(".layers.0." in p for p in groups["text_encoders_reg0"][1])
    assert not any(".layers.0." in p for p in groups["text_encoders"][1])

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))   # the diffusers file carries the same ranks
    pipe.load_lora_weights(str(output))
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    fused, expected = pipe.unet.state_dict(), merged_at_finish["unet"]
    assert max((fused[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_sdxl_blora_preset_adapts_only_its_blocks(tiny_sdxl, image_folder, tmp_path):
    output = tmp_path / "out"
    argv = sd_args(tiny_sdxl, image_folder, output, *STEPS, "--use_lora", "--lora_targets", "attn-mlp",
                   "--output_kohya_format", "--network_args", "block_preset=blora")
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    blocks = {name.split("_attentions_")[0] + "_attentions_" + name.split("_attentions_")[1][0]
              for name in ranks_and_alphas(output / KOHYA_WEIGHT_NAME)}
    assert blocks == {"lora_unet_up_blocks_0_attentions_0", "lora_unet_up_blocks_0_attentions_1"}


def test_a_pattern_that_matches_no_layer_is_named(tiny_sd, image_folder, tmp_path, capsys):
    argv = sd_args(tiny_sd, image_folder, tmp_path / "out", *STEPS, "--use_lora",
                   "--network_args", "network_reg_lrs=no_such_layer=1e-3")
    capsys.readouterr()
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 1
    assert "--network_args network_reg_lrs: 'no_such_layer' matches no adapted layer" in capsys.readouterr().err
