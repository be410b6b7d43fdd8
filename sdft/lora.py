"""LoRA adapters through peft, saved and loaded in the diffusers LoRA file format.

The file written here is what `pipe.load_lora_weights(folder)` reads, both for the final output
and inside every checkpoint, so a checkpoint's LoRA can be tried in a pipeline as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DENOISER_ROLES = ("unet", "transformer")


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
        layers[f"{role}_lora_layers"] = diffusers_keys(state) if key_format == "diffusers" else state
        layers[f"{role}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(str(directory), safe_serialization=True, **layers)
    path = Path(directory) / WEIGHT_NAME
    if metadata:
        add_file_metadata(path, metadata)
    return path


def diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers scripts' lora.down/lora.up keys, where every key has that form. diffusers only renames
    the attention projections; a file mixing them with the lora_A/lora_B keys of other layers (feed-forward,
    proj_in, convolutions) is read as PEFT and its renamed keys are dropped, so such adapters stay PEFT."""
    converted = convert_state_dict_to_diffusers(state)
    return state if any(".lora_A." in key or ".lora_B." in key for key in converted) else converted


def add_file_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge string metadata into a safetensors header, keeping what the writer put there (diffusers
    stores its adapter config in the same header). LoRA files are small, so rewriting is cheap."""
    with safe_open(str(path), framework="pt") as handle:
        existing = handle.metadata() or {}
    save_file(load_file(str(path)), str(path), metadata={**existing, **metadata})


def rank_and_alpha(modules: dict[str, torch.nn.Module]) -> tuple[int, float]:
    """The (rank, alpha) of the adapters, for the file metadata (all roles share one config here)."""
    config = next(m for m in modules.values() if hasattr(m, "peft_config")).peft_config["default"]
    return config.r, getattr(config, "lora_alpha", None) or config.alpha   # LoraConfig, or LoHa/LoKrConfig


def load_lora(pipeline_cls, directory: str | Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load a LoRA file written by `save_lora` back into models that already carry adapters."""
    state = pipeline_cls.lora_state_dict(str(directory))
    if isinstance(state, tuple):  # some pipelines also return network alphas
        state = state[0]
    apply_lora_state(state, modules, Path(directory) / WEIGHT_NAME)


def apply_lora_state(state: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], source: Path) -> None:
    """Copy a diffusers/PEFT-layout state dict (`<role>.<module>.lora_A...`) into the adapters of
    `modules`; a role, key or shape the model's adapters lack is an error naming the first one."""
    for role, module in modules.items():
        prefix = f"{role}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(f"{source} has no LoRA weights for the {role}.")
        if role in DENOISER_ROLES:
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        check_same_keys(part, get_peft_model_state_dict(module), f"{source} ({role})")
        set_peft_model_state_dict(module, part, adapter_name="default")


def check_same_keys(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    for key in found:
        if key not in expected:
            raise ValueError(f"{source}: '{key}' matches no adapter layer of the model (--lora_type, "
                             "--lora_targets, --use_dora or the base model differ).")
    for key, value in expected.items():
        if key not in found:
            raise ValueError(f"{source} has no '{key}': the file adapts other layers (--lora_targets).")
        if found[key].shape != value.shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(found[key].shape)}, the model's adapter "
                             f"{tuple(value.shape)} (--rank or --conv_rank differ).")
