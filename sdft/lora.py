"""LoRA adapters through peft, saved and loaded in the diffusers LoRA file format.

The file written here is what `pipe.load_lora_weights(folder)` reads, both for the final output
and inside every checkpoint, so a checkpoint's LoRA can be tried in a pipeline as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
DENOISER_ROLES = ("unet", "transformer")


def add_lora(module: torch.nn.Module, rank: int, target_modules: list[str], dropout: float = 0.0) -> None:
    """Gaussian init, alpha = rank: the convention of the diffusers LoRA scripts, so ranks and
    learning rates carry over from their recipes."""
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=target_modules)
    module.add_adapter(config)


def save_lora(pipeline_cls, directory: str | Path, modules: dict[str, torch.nn.Module],
              dtype: torch.dtype | None = None, key_format: str = "diffusers",
              metadata: dict[str, str] | None = None) -> Path:
    """`modules` maps roles (unet, transformer, text_encoder, text_encoder_2) to unwrapped models.
    `key_format` is what the family's diffusers LoRA script writes: "diffusers" (lora.down/lora.up,
    SD and SDXL) or "peft" (lora_A/lora_B, SD3); diffusers' loaders read both. Each role's peft
    config goes into the file too (diffusers' `*_lora_adapter_metadata`), so the loader uses the
    trained alpha instead of assuming alpha = rank; `metadata` adds the ss_*/modelspec.* keys."""
    layers = {}
    for role, module in modules.items():
        state = get_peft_model_state_dict(module)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        layers[f"{role}_lora_layers"] = convert_state_dict_to_diffusers(state) if key_format == "diffusers" else state
        layers[f"{role}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(str(directory), safe_serialization=True, **layers)
    path = Path(directory) / WEIGHT_NAME
    if metadata:
        add_file_metadata(path, metadata)
    return path


def add_file_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge string metadata into a safetensors header, keeping what the writer put there (diffusers
    stores its adapter config in the same header). LoRA files are small, so rewriting is cheap."""
    with safe_open(str(path), framework="pt") as handle:
        existing = handle.metadata() or {}
    save_file(load_file(str(path)), str(path), metadata={**existing, **metadata})


def rank_and_alpha(modules: dict[str, torch.nn.Module]) -> tuple[int, float]:
    """The (rank, alpha) of the adapters, for the file metadata (all roles share one config here)."""
    config = next(m for m in modules.values() if hasattr(m, "peft_config")).peft_config["default"]
    return config.r, config.lora_alpha


def load_lora(pipeline_cls, directory: str | Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load a LoRA file written by `save_lora` back into models that already carry adapters."""
    state = pipeline_cls.lora_state_dict(str(directory))
    if isinstance(state, tuple):  # some pipelines also return network alphas
        state = state[0]
    for role, module in modules.items():
        prefix = f"{role}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(f"{Path(directory) / WEIGHT_NAME} has no LoRA weights for the {role}.")
        if role in DENOISER_ROLES:
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        result = set_peft_model_state_dict(module, part, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA weights for the {role} in {directory} do not match the model: "
                             f"unexpected keys {unexpected[:3]}...")


def save_kohya(directory: str | Path, modules: dict[str, torch.nn.Module], text_encoder_prefixes: dict[str, str],
               dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """The same LoRA with kohya key names (`lora_unet_*`, `lora_te_*` or `lora_te1_*`/`lora_te2_*`
    with `.lora_down`/`.lora_up`/`.alpha`), the layout ComfyUI, A1111 and Forge load natively.

    `text_encoder_prefixes` maps roles to kohya prefixes (lora_te for SD 1.x/2.x, lora_te1/lora_te2
    for SDXL). Names come from diffusers' `convert_state_dict_to_kohya`; two things are fixed up:
    the text encoders' names always carry the `text_model` level these tools expect (transformers
    5 dropped it from CLIPTextModel, not from CLIPTextModelWithProjection), and `.alpha` is the
    alpha each layer was trained with, not the rank."""
    peft_state, alphas = {}, {}
    for role, module in modules.items():
        level = "text_model." if role in text_encoder_prefixes and not hasattr(module, "text_model") else ""
        for key, value in get_peft_model_state_dict(module).items():
            peft_state[f"{role}.{level}{key}"] = value
        for name, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.r:
                alphas[kohya_name(text_encoder_prefixes.get(role, "lora_unet"), level + name)] = \
                    layer.scaling["default"] * layer.r["default"]
    tensors = {}
    for key, value in convert_state_dict_to_kohya(peft_state).items():
        key = rename_text_encoder_prefix(key, text_encoder_prefixes)
        if key.endswith(".alpha"):
            value = torch.tensor(float(alphas[key.removesuffix(".alpha")]))
        elif dtype is not None:
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    target = Path(directory) / KOHYA_WEIGHT_NAME
    save_file(tensors, str(target), metadata=metadata)
    return target


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def rename_text_encoder_prefix(key: str, text_encoder_prefixes: dict[str, str]) -> str:
    """convert_state_dict_to_kohya names the encoders lora_te1/lora_te2 (SDXL's scheme)."""
    diffusers_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for role, prefix in text_encoder_prefixes.items():
        if key.startswith(diffusers_prefix[role]):
            return prefix + "_" + key[len(diffusers_prefix[role]):]
    return key
