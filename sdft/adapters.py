"""Adapter types and the layers they adapt, built with peft's configs.

peft, not the `lycoris-lora` package (which installs from PyPI here): peft is already a
dependency, its adapters are what diffusers' `add_adapter`/`load_lora_weights` speak, and it ships
LoRA (with DoRA and convolution layers), LoHa and LoKr with the same parameter names LyCORIS uses.
The kohya/LyCORIS file layout UIs load is written from peft's weights (sdft.adapter_files), so
a second adapter implementation (with its own module wrapping, checkpoint and loading path) would
add nothing the files need.

Targets follow kohya's `networks.lora` (community-trainers.md section 2.10): `attn-mlp` adapts every
Linear and 1x1 Conv2d inside the U-Net's Transformer2DModel blocks (attention, feed-forward,
proj_in/proj_out) and the CLIP attention and MLP; `full` adds the ResNet blocks and the
up/downsamplers, their 3x3 convolutions at --conv_rank/--conv_alpha (kohya's `conv_dim`, "LoCon").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig

ADAPTER_TYPES = ("lora", "locon", "loha", "lokr")
TARGET_PRESETS = ("attn", "attn-mlp", "full")
CLIP_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Module classes whose Linear/Conv2d children each preset adapts (kohya's target module classes).
TRANSFORMER_BLOCKS = ("Transformer2DModel",)
RESNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
CLIP_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


@dataclass(frozen=True)
class LoraSpec:
    """One adapter for every trained module. `alpha` None means alpha = rank (the diffusers scripts'
    convention); `conv_rank`/`conv_alpha` None mean rank/alpha. `denoiser_targets` is the family's
    module-name list, used as is by the `attn` preset without a regex (the layers sdft always adapted)."""

    rank: int
    denoiser_targets: list[str]
    text_encoder_targets: list[str] = field(default_factory=lambda: list(CLIP_ATTENTION_TARGETS))
    dropout: float = 0.0
    alpha: float | None = None
    adapter: str = "lora"              # lora, locon, loha or lokr
    use_dora: bool = False
    preset: str = "attn"
    regex: str | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    lokr_factor: int = -1              # peft's decompose_factor: -1 picks the most square factorisation
    rank_dropout: float = 0.0          # LoHa/LoKr (peft implements these for the LyCORIS types)
    module_dropout: float = 0.0

    @property
    def lora_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha

    @property
    def conv(self) -> tuple[int, float]:
        rank = self.conv_rank or self.rank
        return rank, self.conv_alpha if self.conv_alpha is not None else (
            self.lora_alpha if self.conv_rank is None else rank)

    @property
    def peft_type(self) -> str:
        return "lora" if self.adapter == "locon" else self.adapter


def adaptable_layers(module: torch.nn.Module, preset: str, regex: str | None) -> list[str]:
    """Names of the Linear/Conv2d layers of `module` the preset (or, if given, the regex, searched in
    each layer's full name) selects, in module order."""
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}
    if regex is not None:
        pattern = re.compile(regex)
        return [name for name in layers if pattern.search(name)]
    containers = TRANSFORMER_BLOCKS + CLIP_BLOCKS + (RESNET_BLOCKS if preset == "full" else ())
    chosen = []
    for name, block in module.named_modules():
        if type(block).__name__ not in containers:
            continue
        for child, layer in block.named_modules():
            full = f"{name}.{child}" if child else name
            if full in layers and full not in chosen and (preset == "full" or not is_spatial_conv(layer)):
                chosen.append(full)
    return chosen


def is_spatial_conv(layer: torch.nn.Module) -> bool:
    return isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def targets_for(module: torch.nn.Module, spec: LoraSpec, is_denoiser: bool) -> list[str]:
    if spec.preset == "attn" and spec.regex is None:
        return spec.denoiser_targets if is_denoiser else spec.text_encoder_targets
    names = adaptable_layers(module, spec.preset, spec.regex)
    if not names:
        raise ValueError(f"--lora_target_regex '{spec.regex}' matches no Linear or Conv2d layer of the "
                         f"{type(module).__name__}.")
    return names


def peft_config(module: torch.nn.Module, spec: LoraSpec, targets: list[str]):
    """The peft config for `targets`; 3x3 convolutions get the conv rank and alpha."""
    layers = dict(module.named_modules())
    conv_rank, conv_alpha = spec.conv
    spatial = [re.escape(name) for name in targets if name in layers and is_spatial_conv(layers[name])]
    rank_pattern = {name: conv_rank for name in spatial}
    alpha_pattern = {name: conv_alpha for name in spatial}
    common = {"r": spec.rank, "target_modules": targets, "rank_pattern": rank_pattern}
    if spec.peft_type == "lora":
        # Gaussian init for lora_A: the diffusers LoRA scripts' choice, so golden runs stay identical.
        return LoraConfig(lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, init_lora_weights="gaussian",
                          use_dora=spec.use_dora, alpha_pattern=alpha_pattern, **common)
    config_cls = LoHaConfig if spec.peft_type == "loha" else LoKrConfig
    extra = {"decompose_factor": spec.lokr_factor} if spec.peft_type == "lokr" else {}
    return config_cls(alpha=spec.lora_alpha, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout,
                      alpha_pattern=alpha_pattern, **common, **extra)


def adapter_parameter_count(module: torch.nn.Module, spec: LoraSpec) -> int:
    """Trained parameters of the adapter on the denoiser `module` (built on the meta device is enough),
    counted as LoRA: rank x (inputs + outputs) per adapted layer, a 3x3 convolution's inputs times
    its kernel; for the memory estimate (LoHa and LoKr differ by small factors)."""
    targets = targets_for(module, spec, is_denoiser=True)
    conv_rank, _ = spec.conv
    total = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not any(
                name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(layer, torch.nn.Linear):
            total += spec.rank * (layer.in_features + layer.out_features)
        else:
            rank = conv_rank if is_spatial_conv(layer) else spec.rank
            total += rank * (layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + layer.out_channels)
    return total


def add_adapter(module: torch.nn.Module, spec: LoraSpec, is_denoiser: bool) -> None:
    module.add_adapter(peft_config(module, spec, targets_for(module, spec, is_denoiser)))


def network_args(spec: LoraSpec) -> dict[str, str]:
    """kohya's `ss_network_args` (strings, as sd-scripts writes them) plus sdft's own target choice."""
    args = {"preset": spec.preset}
    if spec.regex is not None:
        args["target_regex"] = spec.regex
    if spec.adapter in ("locon", "loha", "lokr") or spec.preset == "full" or spec.conv_rank is not None:
        conv_rank, conv_alpha = spec.conv
        args.update(conv_dim=str(conv_rank), conv_alpha=format_number(conv_alpha))
    if spec.adapter in ("loha", "lokr") or spec.use_dora:
        args["algo"] = spec.adapter
    if spec.adapter == "lokr":
        args["factor"] = str(spec.lokr_factor)
    if spec.use_dora:
        args["dora_wd"] = "True"
    if spec.dropout:
        args["dropout"] = format_number(spec.dropout)
    if spec.rank_dropout:
        args["rank_dropout"] = format_number(spec.rank_dropout)
    if spec.module_dropout:
        args["module_dropout"] = format_number(spec.module_dropout)
    return args


def network_module(spec: LoraSpec) -> str:
    """kohya's `ss_network_module`: its own LoRA module for LoRA/LoCon, LyCORIS's for LoHa, LoKr and DoRA."""
    return "lycoris.kohya" if spec.adapter in ("loha", "lokr") or spec.use_dora else "networks.lora"


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
