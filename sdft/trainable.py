"""What a run trains and how: which modules are frozen (and in which dtype and device), which are
trained fully or through LoRA, and the optimizer parameter groups they form."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdft.lora import add_lora

CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    denoiser_targets: list[str]
    text_encoder_targets: list[str] = field(default_factory=lambda: list(CLIP_LORA_TARGETS))
    dropout: float = 0.0


@dataclass(frozen=True)
class Placement:
    device: torch.device
    weight_dtype: torch.dtype          # frozen modules and LoRA base weights
    vae_dtype: torch.dtype             # some VAEs overflow in fp16 (SDXL)
    trained_dtype: torch.dtype = torch.float32   # fully trained modules: fp32 master weights, bf16 with --full_bf16


def prepare_models(family, models, trained_roles: list[str], placement: Placement, *, lora: LoraSpec | None,
                   gradient_checkpointing: bool, xformers: bool,
                   npu_flash_attention: bool = False) -> dict[str, torch.nn.Module]:
    """Freeze and place everything not trained; make `trained_roles` trainable. Returns role -> module."""
    for role, module in family.components(models).items():
        if role in trained_roles:
            continue
        module.requires_grad_(False)
        module.eval()
        module.to(placement.device, dtype=placement.vae_dtype if role == "vae" else placement.weight_dtype)
    trained = {}
    for role in trained_roles:
        module = getattr(models, role)
        is_denoiser = role == family.denoiser_role
        if lora is not None:
            make_lora_trainable(module, lora.denoiser_targets if is_denoiser else lora.text_encoder_targets,
                                lora, placement)
        else:
            module.requires_grad_(True)
            module.to(placement.device, dtype=placement.trained_dtype)
        if gradient_checkpointing:
            enable_gradient_checkpointing(module, needs_input_grads=lora is not None and not is_denoiser)
        module.train()
        trained[role] = module
    denoiser = getattr(models, family.denoiser_role)
    if xformers:
        denoiser.enable_xformers_memory_efficient_attention()
    if npu_flash_attention:
        denoiser.enable_npu_flash_attention()
    return trained


def make_lora_trainable(module: torch.nn.Module, targets: list[str], lora: LoraSpec, placement: Placement) -> None:
    module.requires_grad_(False)
    module.to(placement.device, dtype=placement.weight_dtype)
    add_lora(module, lora.rank, targets, lora.dropout)
    # LoRA weights stay fp32 under fp16/bf16: the grad scaler refuses fp16 gradients (diffusers #6363),
    # and bf16 updates of small LoRA weights lose most of their precision.
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def enable_gradient_checkpointing(module: torch.nn.Module, needs_input_grads: bool) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):      # diffusers models
        module.enable_gradient_checkpointing()
        return
    module.gradient_checkpointing_enable()                     # transformers models
    if needs_input_grads:
        # With a frozen embedding nothing before the checkpointed blocks requires grad, and
        # checkpointing would then drop the LoRA gradients.
        module.enable_input_require_grads()


def trainable_params(trained: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """A list, not a generator: it is used by both the optimizer and gradient clipping
    (diffusers' LoRA script passes one exhausted `filter` to both, so its clipping does nothing)."""
    return [p for module in trained.values() for p in module.parameters() if p.requires_grad]


def param_groups(trained: dict[str, torch.nn.Module], denoiser_role: str, text_encoder_lr: float | None = None,
                 text_encoder_weight_decay: float | None = None,
                 new_token_params: list[torch.nn.Parameter] | None = None) -> list[dict]:
    """The optimizer's parameter groups, built once per run and handed to whichever optimizer is
    chosen: the denoiser, the text encoders (with their own lr/decay when given), the new token
    embeddings (--train_text_encoder_ti). Every torch-style optimizer reads `lr` and `weight_decay`
    per group, and the LR schedule scales each group's own rate; `name` labels a group's rate in the log."""
    denoiser = [p for p in trained[denoiser_role].parameters() if p.requires_grad] if denoiser_role in trained else []
    encoders = [p for role, m in trained.items() if role != denoiser_role for p in m.parameters() if p.requires_grad]
    groups = [{"params": denoiser, "name": denoiser_role}] if denoiser else []   # none with a frozen denoiser (TI)
    if encoders:
        group = {"params": encoders, "name": "text_encoders"}
        if text_encoder_lr is not None:
            group["lr"] = text_encoder_lr
        if text_encoder_weight_decay is not None:
            group["weight_decay"] = text_encoder_weight_decay
        groups.append(group)
    if new_token_params:
        groups.append({"params": list(new_token_params), "name": "new_tokens"})
    return groups
