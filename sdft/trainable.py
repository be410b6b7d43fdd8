"""What a run trains and how: which modules are frozen (and in which dtype and device), which are
trained fully or through LoRA, and the optimizer parameter groups they form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdft.adapter_blocks import LayerNames, role_names
from sdft.adapters import LoraSpec, add_adapter


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
            names = role_names({role: module}, family.kohya_text_encoder_prefixes)[role]
            make_lora_trainable(module, lora, placement, is_denoiser, names)
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


def make_lora_trainable(module: torch.nn.Module, lora: LoraSpec, placement: Placement, is_denoiser: bool,
                        names: LayerNames | None = None) -> None:
    module.requires_grad_(False)
    module.to(placement.device, dtype=placement.weight_dtype)
    add_adapter(module, lora, is_denoiser, names)
    # Adapter weights stay fp32 under fp16/bf16: the grad scaler refuses fp16 gradients (diffusers #6363),
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
                 text_encoder_weight_decay: float | None = None, role_lrs: dict[str, float] | None = None,
                 new_token_params: list[torch.nn.Parameter] | None = None) -> list[dict]:
    """The optimizer's parameter groups, built once per run and handed to whichever optimizer is
    chosen: the denoiser, each encoder with a learning rate of its own in `role_lrs` (SDXL's
    --learning_rate_te1/2), the other text encoders (with their own lr/decay when given), the new
    token embeddings (--train_text_encoder_ti). Every torch-style optimizer reads `lr` and
    `weight_decay` per group, and the LR schedule scales each group's own rate; `name` labels a
    group's rate in the log."""
    role_lrs = role_lrs or {}
    denoiser = [p for p in trained[denoiser_role].parameters() if p.requires_grad] if denoiser_role in trained else []
    encoders = [p for role, m in trained.items() if role != denoiser_role and role not in role_lrs
                for p in m.parameters() if p.requires_grad]
    groups = [{"params": denoiser, "name": denoiser_role}] if denoiser else []   # none with a frozen denoiser (TI)
    for role, lr in role_lrs.items():
        own = [p for p in trained[role].parameters() if p.requires_grad] if role in trained else []
        if own:
            groups.append({"params": own, "lr": lr, "name": role, **({"weight_decay": text_encoder_weight_decay}
                                                                      if text_encoder_weight_decay is not None else {})})
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


def loraplus_groups(groups: list[dict], trained: dict[str, torch.nn.Module], ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B ("up") matrices learn `ratio` times faster
    than the A ("down") matrices. Each group is split in two; the B half carries `lr_scale`, which
    the optimizer builder turns into a learning rate once the base rate is known."""
    up = {id(p) for module in trained.values() for name, p in module.named_parameters() if ".lora_B." in name}
    split = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in up]
        faster = [p for p in group["params"] if id(p) in up]
        split += [{**group, "params": rest}] if rest else []
        split += [{**group, "params": faster, "lr_scale": group.get("lr_scale", 1.0) * ratio,
                   **({"name": group["name"] + "_lora_up"} if "name" in group else {})}] if faster else []
    return split
