"""A full fine-tune as one `.safetensors` checkpoint in the original (Stability) layout: the file
ComfyUI, A1111 and Forge load from models/checkpoints, and diffusers' `from_single_file` reads.

diffusers ships only the other direction (`diffusers/loaders/single_file_utils.py`: original ->
diffusers). The renaming here is its inverse: block indices follow the arithmetic of
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` run backwards, and the fixed names
are taken from diffusers' own `DIFFUSERS_TO_LDM_MAPPING` table. Because an inverse written by hand
can drift from the reader, every file is checked before it is written: diffusers' converters are
run on the renamed weights and must give back exactly the weights of the trained model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_UNET_KEY,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import save_file

VAE_PREFIX = "first_stage_model."
# Where each text encoder lives in the original checkpoints, and whether it is stored in the
# OpenCLIP layout (fused in_proj, resblocks) or as Hugging Face CLIP keys.
TEXT_ENCODER_LAYOUT = {
    "sd_v1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd_v2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl_base_v1-0": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                       "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},
    "sd3": {"text_encoder": ("text_encoders.clip_l.transformer.", "clip"),
            "text_encoder_2": ("text_encoders.clip_g.transformer.", "clip"),
            "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5")},
}
# SD3's MMDiT, the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers: fixed
# names, then per block (x_block = image stream, context_block = text stream). q/k/v are stored
# fused as one `qkv` projection; the adaLN weights marked "swap" store (shift, scale) where
# diffusers has (scale, shift).
SD3_FIXED = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
             "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}
SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
             "attn2.norm_k": "x_block.attn2.ln_k",
             "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
SD3_QKV = {("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
           ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
           ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv"}
# The resnet sub-layer renames of diffusers' update_unet_resnet_ldm_to_diffusers, reversed.
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# The VAE attention renames of diffusers' update_vae_attentions_ldm_to_diffusers, reversed.
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileError(RuntimeError):
    """The renamed weights would not read back as the trained model; nothing was written."""


def save_single_file(layout: str, components: dict[str, torch.nn.Module], path: Path,
                     dtype: torch.dtype, metadata: dict[str, str] | None = None,
                     vocab_sizes: dict[str, int] | None = None, markers: tuple[str, ...] = ()) -> Path:
    """`layout` is the base model version (sd_v1, sd_v2, sdxl_base_v1-0, sd3); `components` maps
    diffusers roles (unet or transformer, vae, text_encoder, text_encoder_2, text_encoder_3) to
    models. `markers` are key names stored as empty tensors, the way ComfyUI and Forge mark a
    v-prediction (`v_pred`) or zero-terminal-SNR (`ztsnr`) checkpoint. `vocab_sizes` keeps only the
    first rows of a text encoder's token table: tokens learned by textual inversion travel in their
    own embeddings file, and UIs expect the base vocabulary."""
    if layout not in TEXT_ENCODER_LAYOUT:
        raise SingleFileError(f"No single-file layout for '{layout}' models.")
    checkpoint = original_checkpoint(layout, components, vocab_sizes or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for key, value in checkpoint.items():
        value = value.detach().to("cpu", dtype=dtype if value.is_floating_point() else value.dtype).contiguous()
        if value.data_ptr() in seen:   # tied weights (T5's embeddings): safetensors stores each once
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    tensors.update({marker: torch.tensor([]) for marker in markers})
    save_file(tensors, str(path), metadata=metadata)
    return path


def original_checkpoint(layout: str, components: dict[str, torch.nn.Module],
                        vocab_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """All components renamed into one original-layout state dict, each checked against diffusers."""
    checkpoint = denoiser_to_original(layout, components)
    vae = components["vae"]
    vae_part = {VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()}
    verify("vae", vae.state_dict(), convert_ldm_vae_checkpoint(vae_part, vae.config))
    checkpoint.update(vae_part)
    for role, (prefix, kind) in TEXT_ENCODER_LAYOUT[layout].items():
        encoder = components[role]
        state = with_text_model_level(encoder) if kind != "t5" else encoder.state_dict()
        if role in vocab_sizes:
            table = "text_model.embeddings.token_embedding.weight"
            state = {**state, table: state[table][:vocab_sizes[role]]}
        part = {prefix + k: v for k, v in (open_clip_to_original(state) if kind == "open_clip" else state).items()}
        if kind == "open_clip":
            read_back = convert_open_clip_checkpoint(encoder, part, prefix=prefix)
        elif kind == "t5":
            read_back = convert_sd3_t5_checkpoint_to_diffusers(part)
        else:
            read_back = convert_ldm_clip_checkpoint(part, remove_prefix=prefix)
        verify(role, state, read_back)
        checkpoint.update(part)
    return checkpoint


def denoiser_to_original(layout: str, components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    if layout == "sd3":
        transformer = components["transformer"]
        part = {LDM_UNET_KEY + k: v for k, v in mmdit_to_original(transformer.state_dict()).items()}
        # diffusers' SD3 converter pops keys from what it is given: hand it a copy.
        verify("transformer", transformer.state_dict(), convert_sd3_transformer_checkpoint_to_diffusers(dict(part)))
        return part
    unet = components["unet"]
    part = {LDM_UNET_KEY + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    verify("unet", unet.state_dict(), convert_ldm_unet_checkpoint(part, unet.config))
    return part


def verify(role: str, expected: dict[str, torch.Tensor], read_back: dict[str, torch.Tensor]) -> None:
    missing, extra = expected.keys() - read_back.keys(), read_back.keys() - expected.keys()
    if missing or extra:
        raise SingleFileError(f"The single-file {role} would not load back: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(extra)[:3]}.")
    for key, value in expected.items():
        if read_back[key].shape != value.shape or not torch.equal(read_back[key], value):
            raise SingleFileError(f"The single-file {role} would load '{key}' with other values.")


def with_text_model_level(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP keys as original checkpoints store them, with `text_model.` whatever the transformers
    version (5.x dropped that level from CLIPTextModel)."""
    state = encoder.state_dict()
    if hasattr(encoder, "text_model"):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = unet_block_prefixes(config)
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]}
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    converted = {}
    for key, value in state.items():
        if key in fixed:
            converted[fixed[key]] = value
            continue
        block = re.match(r"((?:down|up)_blocks\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+|"
                         r"mid_block\.(?:resnets|attentions)\.\d+)\.(.*)", key)
        if block is None or block.group(1) not in prefixes:
            raise SingleFileError(f"UNet weight '{key}' has no place in the original layout.")
        rest = block.group(2)
        if ".resnets." in block.group(1):
            rest = rename_first(rest, UNET_RESNET_NAMES)
        elif "downsamplers." in block.group(1):
            rest = rest.removeprefix("conv.")   # the original downsampler is the bare `op` convolution
        converted[f"{prefixes[block.group(1)]}.{rest}"] = value
    return converted


def unet_block_prefixes(config) -> dict[str, str]:
    """diffusers block -> original block, e.g. down_blocks.1.attentions.0 -> input_blocks.4.1.
    Each down block holds layers_per_block (resnet, attention) pairs and a downsampler; each up
    block one pair more, its upsampler after the last pair's attention."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise SingleFileError("UNets with a different layers_per_block per block have no original layout here.")
    prefixes = {}
    for b in range(len(config["down_block_types"])):
        for layer in range(per_block):
            index = 1 + b * (per_block + 1) + layer
            prefixes[f"down_blocks.{b}.resnets.{layer}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{b}.attentions.{layer}"] = f"input_blocks.{index}.1"
        prefixes[f"down_blocks.{b}.downsamplers.0"] = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op"
    prefixes.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                     "mid_block.resnets.1": "middle_block.2"})
    for b, block_type in enumerate(config["up_block_types"]):
        for layer in range(per_block + 1):
            index = b * (per_block + 1) + layer
            prefixes[f"up_blocks.{b}.resnets.{layer}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{b}.attentions.{layer}"] = f"output_blocks.{index}.1"
        upsampler_slot = 2 if "CrossAttn" in block_type else 1
        prefixes[f"up_blocks.{b}.upsamplers.0"] = f"output_blocks.{b * (per_block + 1) + per_block}.{upsampler_slot}"
    return prefixes


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    fixed = {diffusers: original for diffusers, original in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    num_up = len(config["up_block_types"])
    converted = {}
    for key, value in state.items():
        if key in fixed:
            converted[fixed[key]] = value
            continue
        # Original decoders number their up blocks from the lowest resolution upwards.
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
        key = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", key).replace("conv_shortcut", "nin_shortcut")
        key = key.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
        key = re.sub(r"mid_block\.block\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
        if ".mid_block.attentions.0." in key:
            key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            head, name = key.split(".mid.attn_1.")
            key = f"{head}.mid.attn_1.{rename_first(name, VAE_ATTENTION_NAMES)}"
            if value.ndim == 2:   # original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        converted[key] = value
    return converted


def mmdit_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    last = max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    converted, fused = {}, {}
    for key, value in state.items():
        name, kind = key.rsplit(".", 1) if key != "pos_embed.pos_embed" else (key, "")
        if name in SD3_FIXED:
            value = swap_halves(value) if name == "norm_out.linear" else value
            converted[".".join(filter(None, [SD3_FIXED[name], kind]))] = value
            continue
        block, sub = re.match(r"transformer_blocks\.(\d+)\.(.*)", name).groups()
        group = next((g for g in SD3_QKV if sub in g), None)
        if group is not None:
            fused.setdefault((block, SD3_QKV[group], kind), {})[group.index(sub)] = value
            continue
        if sub not in SD3_BLOCK:
            raise SingleFileError(f"SD3 weight '{key}' has no place in the original layout.")
        if sub == "norm1_context.linear" and int(block) == last:
            value = swap_halves(value)   # the last block's text stream keeps only shift and scale
        converted[f"joint_blocks.{block}.{SD3_BLOCK[sub]}.{kind}"] = value
    for (block, target, kind), parts in fused.items():
        converted[f"joint_blocks.{block}.{target}.{kind}"] = torch.cat([parts[0], parts[1], parts[2]])
    return converted


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def open_clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP keys -> OpenCLIP's: q/k/v fused into in_proj, text_projection transposed."""
    openclip = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    renames = [(new, old) for new, old in openclip["transformer"].items() if not new.startswith("transformer.")]
    converted, qkv = {}, {}
    for key, value in state.items():
        if key in openclip["layers"]:
            converted[openclip["layers"][key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        projection = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if projection:
            qkv.setdefault((projection.group(1), projection.group(3)), {})[projection.group(2)] = value
            continue
        for new, old in renames:
            key = key.replace(new, old)
        converted["transformer." + key] = value
    for (layer, kind), parts in qkv.items():
        for new, old in renames:
            layer = layer.replace(new, old)
        converted[f"transformer.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def rename_first(name: str, renames: dict[str, str]) -> str:
    for new, old in renames.items():
        if name.startswith(new + "."):
            return old + name[len(new):]
    return name
