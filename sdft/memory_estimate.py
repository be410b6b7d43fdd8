"""The memory a run's trained model needs, from its parameter shapes and the flags, before any
weight is loaded: weights, gradients, optimizer state and EMA. Activations and the frozen
components (VAE, text encoders) come on top and are not estimated.

Bytes per parameter, as the trainer and the optimizers allocate them:

- weights: fp32 (4) for full fine-tuning, bf16 (2) with --full_bf16; with LoRA the denoiser is
  frozen in the mixed-precision dtype, its Linear weights in fp8/int8 (1) or nf4 (~0.52) with
  --base_precision (sdft.quantization.STORAGE_BYTES), and the adapters (when counted) train in fp32
  with a gradient and the optimizer's state each;
- gradients: one per weight in the weight's dtype, except with --fused_backward_pass, where each
  gradient is applied and freed in its hook (counted as the largest tensor's);
- optimizer state: AdamW two moments (8 bytes in fp32, 2 with 8-bit Adam), Prodigy four tensors
  (16), Adafactor a row and a column vector per matrix and one value per element of the other
  tensors (fp32); with --full_bf16 each parameter's update runs on a transient fp32 copy of that
  one tensor, and the optimizer's state is fp32;
- EMA: an fp32 copy of the denoiser on the accelerator, none there with --offload_ema.

Parameter shapes come from the denoiser's config.json: the model is built on the meta device
(accelerate's `init_empty_weights`), which allocates nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from sdft.adapters import LoraSpec, adapter_parameter_count
from sdft.quantization import STORAGE_BYTES

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class ParamStats:
    """What the arithmetic needs from a model's parameter shapes."""

    count: int
    largest: int                  # elements of the largest tensor
    adafactor_values: int         # elements of Adafactor's second-moment state
    linear: int = 0               # elements of the Linear layers' weights (what --base_precision stores)
    adapters: int = 0             # trained parameters of the LoRA adapters, when counted

    @classmethod
    def of_shapes(cls, shapes: list[tuple[int, ...]]) -> "ParamStats":
        numels = [math.prod(s) for s in shapes]
        factored = [math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:]) if len(s) >= 2 else math.prod(s) for s in shapes]
        return cls(sum(numels), max(numels, default=0), sum(factored))

    @classmethod
    def of_module(cls, module: torch.nn.Module, adapters: int = 0) -> "ParamStats":
        stats = cls.of_shapes([tuple(p.shape) for p in module.parameters()])
        linear = sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear))
        return replace(stats, linear=linear, adapters=adapters)


@dataclass(frozen=True)
class TrainingSetup:
    """The flags that decide the bytes per parameter."""

    lora: bool = False
    optimizer: str = "adamw"          # a curated name (sdft.optim.CURATED, any case) or module.Class
    use_8bit_adam: bool = False
    full_bf16: bool = False
    fused_backward_pass: bool = False
    gradient_accumulation_steps: int = 1   # >1 with the fused pass: gradients add up in full between micro-batches
    mixed_precision: str = "no"       # no | fp16 | bf16
    ema: bool = False
    offload_ema: bool = False
    base_precision: str | None = None   # LoRA: the frozen Linear weights stored in fp8 | int8 | nf4


@dataclass(frozen=True)
class Line:
    name: str
    arithmetic: str
    bytes: int


def _line(name: str, values: int, width: int, what: str) -> Line:
    return Line(name, f"{values / 1e6:,.1f} M x {width} bytes ({what})", values * width)


def estimate(stats: ParamStats, setup: TrainingSetup) -> list[Line]:
    """The estimate, line by line (weights, gradients, optimizer state, EMA)."""
    if setup.lora:
        return lora_lines(stats, setup)
    width = 2 if setup.full_bf16 else 4
    kind = "bf16" if setup.full_bf16 else "fp32"
    lines = [_line("weights", stats.count, width, kind)]
    if setup.fused_backward_pass and setup.gradient_accumulation_steps == 1:
        lines.append(_line("gradients", stats.largest, width, "fused backward pass: about one tensor at a time"))
    else:
        lines.append(_line("gradients", stats.count, width, kind))
    if setup.full_bf16:
        lines.append(_line("update copy", stats.largest, 8, "fp32 weight and gradient of one tensor"))
    lines.append(optimizer_line(stats, setup))
    if setup.ema:
        if setup.offload_ema:
            lines.append(Line("EMA", "on the CPU (--offload_ema)", 0))
        else:
            lines.append(_line("EMA", stats.count, 4, "fp32"))
    return lines


def lora_lines(stats: ParamStats, setup: TrainingSetup) -> list[Line]:
    """The frozen denoiser by storage precision, and the adapters with their gradients and state."""
    width = 2 if setup.mixed_precision in ("fp16", "bf16") else 4
    if setup.base_precision is None:
        lines = [_line("weights", stats.count, width, f"frozen, {setup.mixed_precision}"
                       + ("" if stats.adapters else "; LoRA adapters not counted"))]
    else:
        stored = STORAGE_BYTES[setup.base_precision]
        rest = stats.count - stats.linear
        lines = [Line("weights", f"{stats.linear / 1e6:,.1f} M x {stored:.2f} bytes (Linear, {setup.base_precision}) + "
                      f"{rest / 1e6:,.1f} M x {width} ({setup.mixed_precision})",
                      round(stats.linear * stored) + rest * width)]
    if stats.adapters:
        adapters = ParamStats(stats.adapters, 0, stats.adapters)
        state = optimizer_line(adapters, setup)
        lines.append(_line("adapters", stats.adapters, 8, "fp32 weights and gradients"))
        lines.append(Line("adapter opt.", state.arithmetic, state.bytes))
    return lines


# Bytes of optimizer state per trained weight (fp32 state with --full_bf16 too: the update runs on
# an fp32 copy, see the module docstring).
STATE_BYTES = {
    "adamw": (8, "AdamW: two fp32 moments"), "adamw8bit": (2, "8-bit AdamW moments"),
    "pagedadamw8bit": (2, "8-bit AdamW moments, paged"), "lion": (4, "Lion: one fp32 momentum"),
    "lion8bit": (1, "8-bit Lion momentum"), "prodigy": (16, "Prodigy: four fp32 tensors per weight"),
    "prodigyschedulefree": (8, "Prodigy schedule-free: about two fp32 tensors per weight"),
    "adamwschedulefree": (8, "schedule-free AdamW: z and the second moment, fp32"),
    "radamschedulefree": (8, "schedule-free RAdam: z and the second moment, fp32"),
    "sgdschedulefree": (4, "schedule-free SGD: z, fp32"), "ademamix": (12, "AdEMAMix: three fp32 moments"),
    "ademamix8bit": (3, "AdEMAMix: three 8-bit moments"), "sgdnesterov": (4, "SGD: one fp32 momentum"),
}


def optimizer_line(stats: ParamStats, setup: TrainingSetup) -> Line:
    name = setup.optimizer.lower()
    if name == "adafactor":
        return _line("optimizer", stats.adafactor_values, 4, "Adafactor factored second moments, fp32")
    if name == "came":
        return _line("optimizer", stats.count + 2 * stats.adafactor_values, 4,
                     "CAME: a first moment and two factored moments, fp32")
    if setup.use_8bit_adam and name == "adamw":
        name = "adamw8bit"
    width, what = STATE_BYTES.get(name, (8, f"{setup.optimizer}: assumed two fp32 tensors per weight"))
    return _line("optimizer", stats.count, width, what)


def total(lines: list[Line]) -> int:
    return sum(line.bytes for line in lines)


def binary_size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


def parameter_count(count: int) -> str:
    """In the unit that fits: "0.86 B" (SD 1.5's UNet, as model cards say it), "2.10 M", "930 K"; a
    2 M-parameter model is not "0.00 B" (issue 16)."""
    if count >= 5e8:
        return f"{count / 1e9:.2f} B"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    return f"{count / 1e3:.0f} K" if count >= 1e3 else str(count)


def describe(role: str, stats: ParamStats, lines: list[Line], capacity: int | None, where: str) -> str:
    rows = [f"Memory estimate for training the {role} ({parameter_count(stats.count)} parameters), before "
            "activations and the frozen components:"]
    rows += [f"  {line.name:<12} {line.arithmetic:<68} = {line.bytes / GB:7.2f} GB" for line in lines]
    summed = total(lines)
    rows.append(f"  {'total':<12} {'':<68} = {summed / GB:7.2f} GB ({binary_size(summed)})"
                + (f" of {binary_size(capacity)} {where}" if capacity else ""))
    return "\n".join(rows)


def refusal(description: str, capacity: int, where: str) -> str:
    return (f"{description}\nThis does not fit the {binary_size(capacity)} of {where}. Full fine-tuning needs "
            "less with --optimizer adafactor --fused_backward_pass --full_bf16 --mixed_precision bf16 "
            "(or --use_8bit_adam, --offload_ema, or LoRA with --use_lora); --skip_memory_check runs anyway.")


def fits(lines: list[Line], capacity: int | None) -> bool:
    return capacity is None or total(lines) <= capacity


class DoesNotFit(Exception):
    """The estimate exceeds the device's memory; the message holds the arithmetic."""


def check(stats: ParamStats, setup: TrainingSetup, role: str, device: torch.device, *, skip: bool = False) -> str:
    """The estimate as text, to print; raises DoesNotFit with it when it exceeds the memory of
    `device` (unless `skip`)."""
    lines = estimate(stats, setup)
    capacity, where = device_memory(device)
    description = describe(role, stats, lines, capacity, where)
    if not skip and not fits(lines, capacity):
        raise DoesNotFit(refusal(description, capacity, where))
    return description


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """Total memory of the device the trained model lives on. On the CPU that is the machine's RAM:
    the weights, gradients and optimizer state live there (swap aside)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"memory on {torch.cuda.get_device_name(index)}"
    if device.type == "mps":
        return torch.mps.recommended_max_memory(), "memory the MPS device recommends"
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
        except (ValueError, OSError):
            return None, "RAM"
    return None, device.type


def denoiser_stats(path: str, subfolder: str, revision: str | None = None, cache_dir: str | None = None,
                   adapter: LoraSpec | None = None) -> ParamStats:
    """Parameter shapes of a diffusers model from its config alone (nothing is loaded or allocated),
    and the parameter count of `adapter` on it."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.configuration_utils import ConfigMixin

    class AnyModelConfig(ConfigMixin):  # load_config needs a class that names its config file
        config_name = "config.json"

    config = AnyModelConfig.load_config(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    model_cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights():
        model = model_cls.from_config(config)
    return ParamStats.of_module(model, adapters=adapter_parameter_count(model, adapter) if adapter else 0)
