"""LoRA adapters through peft, saved and loaded in the diffusers LoRA file format.

The file written here is what `pipe.load_lora_weights(folder)` reads, both for the final output
and inside every checkpoint, so a checkpoint's LoRA can be tried in a pipeline as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_kohya, convert_state_dict_to_peft,
                            convert_unet_state_dict_to_peft)
from peft import LoraConfig
from safetensors.torch import save_file
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

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
              dtype: torch.dtype | None = None, key_format: str = "diffusers") -> Path:
    """`modules` maps roles (unet, transformer, text_encoder, text_encoder_2) to unwrapped models.
    `key_format` is what the family's diffusers LoRA script writes: "diffusers" (lora.down/lora.up,
    SD and SDXL) or "peft" (lora_A/lora_B, SD3); diffusers' loaders read both."""
    layers = {}
    for role, module in modules.items():
        state = get_peft_model_state_dict(module)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        layers[f"{role}_lora_layers"] = convert_state_dict_to_diffusers(state) if key_format == "diffusers" else state
    pipeline_cls.save_lora_weights(str(directory), safe_serialization=True, **layers)
    return Path(directory) / WEIGHT_NAME


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


def save_kohya(directory: str | Path, modules: dict[str, torch.nn.Module], dtype: torch.dtype | None = None) -> Path:
    """The same LoRA with kohya key names (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` with
    `.lora_down`/`.lora_up`/`.alpha`), the layout ComfyUI, A1111 and Forge load natively."""
    peft_state = {f"{role}.{key}": value for role, module in modules.items()
                  for key, value in get_peft_model_state_dict(module).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    target = Path(directory) / KOHYA_WEIGHT_NAME
    save_file({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in kohya.items()}, str(target))
    return target
