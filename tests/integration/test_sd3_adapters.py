"""SD3: every adapter type the transformer has layers for, trained by train_dreambooth_sd3.py and
exported in the kohya/LyCORIS layout ComfyUI's SD3 key map reads.

The key map is built here from ComfyUI's published layout (comfy/lora.py `model_lora_keys_unet` for
SD3: `lora_transformer_` + the diffusers module names of comfy/utils.py `mmdit_to_diffusers`, q/k/v
being slices of the fused qkv weight; `model_lora_keys_clip`: clip_l as lora_te1_, clip_g as lora_te2_
`text_model_encoder_layers_<n>_<attention or MLP layer>`), not from sdft's writer. Forge (lllyasviel)
does not load SD3 models; its copy of this key map is commented out.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

import train_dreambooth_sd3 as sd3_script
from sdft.adapter_files import KOHYA_WEIGHT_NAME
from sdft.cli import run
from sdft.lora import WEIGHT_NAME
from sdft.tiny import make_images
from tests.integration.conftest import generate
from tests.integration.test_adapter_runs import merge_file, merged_at_finish, metadata  # noqa: F401

pytestmark = pytest.mark.integration

BLOCK_LAYERS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]   # attn2: SD3.5's dual attention
TOP_LAYERS = ["context_embedder", "time_text_embed.timestep_embedder.linear_1",
              "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
              "time_text_embed.text_embedder.linear_2", "pos_embed.proj", "norm_out.linear", "proj_out"]
CLIP_LAYERS = ["mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"]


def comfy_sd3_key_map(pipe) -> dict[str, tuple[str, str]]:
    """kohya name -> (role, weight key) as ComfyUI maps SD3 LoRA keys."""
    blocks = pipe.transformer.config.num_layers
    layers = [f"transformer_blocks.{i}.{name}" for i in range(blocks) for name in BLOCK_LAYERS] + TOP_LAYERS
    names = {f"lora_transformer_{name.replace('.', '_')}": ("transformer", f"{name}.weight") for name in layers}
    for role, prefix in (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        for n in range(getattr(pipe, role).config.num_hidden_layers):
            names.update({f"{prefix}_text_model_encoder_layers_{n}_{layer.replace('.', '_')}":
                          (role, f"text_model.encoder.layers.{n}.{layer}.weight") for layer in CLIP_LAYERS})
    return names


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "dog", num_images=2, layout="images")


TYPES = {
    "lora": ["--lora_type", "lora", "--train_text_encoder", "--text_encoder_lr", "1e-2", "--output_kohya_format"],
    "locon": ["--lora_type", "locon", "--conv_rank", "2", "--conv_alpha", "1", "--output_kohya_format"],
    "loha": ["--lora_type", "loha", "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1"],
    "lokr": ["--lora_type", "lokr", "--lokr_factor", "4"],
    "dora": ["--lora_type", "lora", "--use_dora", "--output_kohya_format"],
}
NETWORK = {"lora": ("networks.lora", None), "locon": ("networks.lora", None), "loha": ("lycoris.kohya", "loha"),
           "lokr": ("lycoris.kohya", "lokr"), "dora": ("lycoris.kohya", "lora")}


@pytest.mark.parametrize("adapter", list(TYPES))
def test_sd3_adapter_types_export_what_comfyui_maps_and_merge_to_the_trained_weights(
        adapter, tiny_sd3, instance_dir, tmp_path, merged_at_finish):
    output = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_sd3, "--instance_data_dir", instance_dir, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
            "--max_sequence_length", "16", "--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", "0",
            "--report_to", "none", "--use_lora", "--rank", "4", "--lora_alpha", "2", *TYPES[adapter]]
    assert run(sd3_script.main, sd3_script.parse_args([str(a) for a in argv])) == 0

    base = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    roles = list(merged_at_finish)
    assert roles == (["transformer", "text_encoder", "text_encoder_2"] if adapter == "lora" else ["transformer"])
    components = {role: ("", getattr(base, role)) for role in roles}
    merged = merge_file(output / KOHYA_WEIGHT_NAME, components, names=comfy_sd3_key_map(base))
    for role in roles:
        expected, found = merged_at_finish[role], merged[role]
        moved = max((expected[k] - components[role][1].state_dict()[k].float()).abs().max().item() for k in expected)
        assert moved > 1e-4, f"{role}: training did not move the weights"
        worst = max((found[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, f"{adapter} {role}: file merges {worst} away from the trained weights"

    keys = load_file(str(output / KOHYA_WEIGHT_NAME)).keys()
    assert any(k.startswith("lora_transformer_pos_embed_proj.") for k in keys) == (adapter == "locon")
    header = metadata(output / KOHYA_WEIGHT_NAME)
    module, algo = NETWORK[adapter]
    assert header["ss_network_module"] == module and json.loads(header["ss_network_args"]).get("algo") == algo
    assert (output / WEIGHT_NAME).exists() == (adapter in ("lora", "locon", "dora"))
    if adapter == "loha":   # the final images come from the LyCORIS file, read back into the pipeline
        assert list((output / "validation" / "final").glob("*.png"))
    if adapter in ("lora", "locon", "dora"):   # diffusers loads these: same image as the file's merged weights
        base.load_lora_weights(str(output))
        from_diffusers = generate(base, "a photo of sks dog", max_sequence_length=16)
        base.unload_lora_weights()
        for role in roles:
            getattr(base, role).load_state_dict(merged[role])
        from_file = generate(base, "a photo of sks dog", max_sequence_length=16)
        assert np.abs(from_diffusers - from_file).max() < 1e-4
