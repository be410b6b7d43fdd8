"""The memory a run's trained model needs, from its parameter shapes and the flags, before any
weight is loaded: weights, gradients, optimizer state and EMA; and, where the caller passes them
(the trainer does), the frozen components (VAE, text encoders) at their dtype, the text-encoder and
latent caches and, on the CPU, the libraries (see the end of this module). Activations are not
estimated.

Bytes per parameter, as the trainer and the optimizers allocate them:

- weights: fp32 (4) for full fine-tuning, bf16 (2) with --full_bf16; with LoRA the denoiser is
  frozen in the mixed-precision dtype, its Linear weights in fp8/int8 (1) or nf4 (~0.52) with
  --base_precision (sdft.quantization.STORAGE_BYTES), and the adapters (when counted) train in fp32
  with a gradient and the optimizer's state each;
- gradients: one per weight in the weight's dtype, except with --fused_backward_pass, where each
  gradient is applied and freed in its hook (counted as the largest tensor's);
- optimizer state: AdamW two moments (8 bytes in fp32, 2 with 8-bit Adam), Prodigy four tensors
  (16), Adafactor a row and a column vector per matrix and one value per element of the other
  tensors (fp32); with --full_bf16 each parameter's update runs on an fp32 copy of that one
  tensor, in a weight and a gradient buffer sized for the largest tensor and reused (the "update
  copy" line), and the optimizer's state is fp32;
- EMA: an fp32 copy of the denoiser on the accelerator, none there with --offload_ema.
- LoRA (any --lora_type and --lora_targets, --conv_rank, --network_args): the adapters' own fp32
  weights, gradients, optimizer state and EMA, counted on the meta model with the run's adapters added
  (`adapter_stats`), on top of the frozen weights.

Parameter shapes come from the denoiser's config.json: the model is built on the meta device
(accelerate's `init_empty_weights`), which allocates nothing.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch

from sdft.quantization import STORAGE_BYTES

logger = logging.getLogger(__name__)

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class ParamStats:
    """What the arithmetic needs from a model's parameter shapes."""

    count: int
    largest: int                  # elements of the largest tensor
    adafactor_values: int         # elements of Adafactor's second-moment state
    linear: int = 0               # elements of the Linear layers' weights (what --base_precision stores)

    @classmethod
    def of_shapes(cls, shapes: list[tuple[int, ...]]) -> "ParamStats":
        numels = [math.prod(s) for s in shapes]
        factored = [math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:]) if len(s) >= 2 else math.prod(s) for s in shapes]
        return cls(sum(numels), max(numels, default=0), sum(factored))

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "ParamStats":
        stats = cls.of_shapes([tuple(p.shape) for p in module.parameters()])
        linear = sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear))
        return replace(stats, linear=linear)


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
    adapters: ParamStats | None = None   # LoRA: the trainable adapter parameters (adapter_stats); None: unknown
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
        lines = [frozen_weights_line(stats, setup)]
        return lines + (adapter_lines(setup) if setup.adapters is not None else [])
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


def frozen_weights_line(stats: ParamStats, setup: TrainingSetup) -> Line:
    """The frozen denoiser under LoRA: in the training dtype, or its Linear weights at --base_precision."""
    width = 2 if setup.mixed_precision in ("fp16", "bf16") else 4
    unknown = "; LoRA adapters not counted" if setup.adapters is None else ""
    if setup.base_precision is None:
        return _line("weights", stats.count, width, f"frozen, {setup.mixed_precision}{unknown}")
    stored, rest = STORAGE_BYTES[setup.base_precision], stats.count - stats.linear
    return Line("weights", f"{stats.linear / 1e6:,.1f} M x {stored:.2f} bytes (Linear, {setup.base_precision}) + "
                f"{rest / 1e6:,.1f} M x {width} ({setup.mixed_precision}){unknown}",
                round(stats.linear * stored) + rest * width)


def adapter_lines(setup: TrainingSetup) -> list[Line]:
    """The adapters train in fp32 (sdft.trainable): weights, gradients, optimizer state and EMA of their own."""
    adapters = setup.adapters
    lines = [_line("adapters", adapters.count, 4, "fp32"), _line("adapter grads", adapters.count, 4, "fp32")]
    state = optimizer_line(adapters, setup)
    lines.append(Line("adapter optim", state.arithmetic, state.bytes))
    if setup.ema:
        lines.append(Line("adapter EMA", "on the CPU (--offload_ema)", 0) if setup.offload_ema
                     else _line("adapter EMA", adapters.count, 4, "fp32"))
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


def describe(role: str, stats: ParamStats, lines: list[Line], capacity: int | None, where: str,
             beside: bool = False) -> str:
    """`beside`: the lines include what the run holds beside the trained model (frozen parts, caches)."""
    rows = [f"Memory estimate for training the {role} ({parameter_count(stats.count)} parameters), "
            + ("activations not counted:" if beside else "before activations and the frozen components:")]
    rows += [f"  {line.name:<14} {line.arithmetic:<68} = {line.bytes / GB:7.2f} GB" for line in lines]
    summed = total(lines)
    rows.append(f"  {'total':<14} {'':<68} = {summed / GB:7.2f} GB ({binary_size(summed)})"
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


def check(stats: ParamStats, setup: TrainingSetup, role: str, device: torch.device, *, skip: bool = False,
          beside: list[Line] | None = None) -> str:
    """The estimate as text, to print; raises DoesNotFit with it when it exceeds the memory of
    `device` (unless `skip`). `beside`: lines for the frozen components, caches and libraries."""
    lines = estimate(stats, setup) + list(beside or [])
    capacity, where = device_memory(device)
    description = describe(role, stats, lines, capacity, where, beside=bool(beside))
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


def denoiser_stats(path: str, subfolder: str, revision: str | None = None, cache_dir: str | None = None) -> ParamStats:
    """Parameter shapes of a diffusers model from its config alone (nothing is loaded or allocated)."""
    return ParamStats.of_module(denoiser_model(path, subfolder, revision, cache_dir))


def adapter_stats(model: torch.nn.Module, add_adapters) -> ParamStats | None:
    """The trainable parameters `add_adapters(model)` adds to a meta-device model (peft builds its adapter
    layers on the meta device too, so nothing is allocated), whatever the type, targets and ranks; None
    (the estimate then leaves them out) when they cannot be built there: the run reports a bad flag better."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            add_adapters(model)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
        logger.warning("The memory estimate leaves out the adapters: they could not be built on the meta "
                       "device (%s).", err)
        return None
    return ParamStats.of_shapes([tuple(p.shape) for p in model.parameters() if p.requires_grad])


def denoiser_model(path: str, subfolder: str, revision: str | None = None, cache_dir: str | None = None):
    """A diffusers model built from its config on the meta device."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.configuration_utils import ConfigMixin

    class AnyModelConfig(ConfigMixin):  # load_config needs a class that names its config file
        config_name = "config.json"

    config = AnyModelConfig.load_config(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    model_cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights():
        model = model_cls.from_config(config)
    model.requires_grad_(False)     # as the run freezes it before adding adapters
    return model


# --------------------------------------------------------------------------- beside the trained model (issue 26)
# What a run holds besides the trained weights, gradients, optimizer state and EMA: the frozen
# components at the dtype they are kept in, the caches filled before training and, on the CPU, the
# libraries; with these the total is what the whole process tree holds (activations aside).

CACHED_TOKENS = 77    # CLIP's context: the tokens of one cached caption per encoder
# Resident libraries (PyTorch, diffusers, transformers, accelerate) of a CPU run through `accelerate
# launch`: the launcher 250 MiB and the trainer's own about 560 MiB, measured on a tiny SDXL run
# (benchmarks/bench_launch_memory.py, 2026-12-07). On a GPU they live in host memory, not on the device.
CPU_RUNTIME_BYTES = 810 * 2**20
DTYPE_WIDTHS = {2: "bf16/fp16", 4: "fp32"}


def frozen_line(role: str, count: int, width: int) -> Line:
    return _line(role.replace("_", " "), count, width, f"frozen, {DTYPE_WIDTHS.get(width, f'{width}-byte')}")


def text_cache_line(captions: int, values_per_caption: int, width: int) -> Line:
    return Line("text cache", f"{captions} captions x {values_per_caption / 1e3:,.0f} K x {width} bytes "
                              "(text-encoder outputs)", captions * values_per_caption * width)


def latent_cache_line(images: int, values_per_image: int) -> Line:
    return Line("latent cache", f"{images} images x {values_per_image / 1e3:,.1f} K x 4 bytes (VAE posteriors, fp32)",
                images * values_per_image * 4)


def runtime_line(device: torch.device) -> Line | None:
    if device.type != "cpu":
        return None
    return Line("libraries", "PyTorch and co. in the trainer and accelerate's launcher (measured)",
                CPU_RUNTIME_BYTES)


def component_params(path: str, subfolder: str, revision: str | None = None, cache_dir: str | None = None) -> int:
    """Parameters of a pipeline component (a diffusers or a transformers model) from its config alone."""
    import transformers
    from accelerate import init_empty_weights

    try:
        return denoiser_stats(path, subfolder, revision, cache_dir).count
    except (KeyError, AttributeError, OSError, ValueError):   # not a diffusers config: a transformers one
        config = transformers.AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision,
                                                         cache_dir=cache_dir)
        with init_empty_weights():
            model = getattr(transformers, config.architectures[0])(config)
        return sum(p.numel() for p in model.parameters())


def caption_values(path: str, roles: list[str], revision: str | None = None, cache_dir: str | None = None,
                   max_sequence_length: int = CACHED_TOKENS) -> int:
    """Values of one cached caption: each encoder's hidden states (77 tokens; a T5 `max_sequence_length`)
    and the pooled projections of the encoders that have one. About: SD3 pads the CLIP states to T5's width."""
    import transformers

    values = 0
    for role in roles:
        config = transformers.AutoConfig.from_pretrained(path, subfolder=role, revision=revision, cache_dir=cache_dir)
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
        tokens = CACHED_TOKENS if hasattr(config, "max_position_embeddings") else max_sequence_length
        pooled = config.projection_dim if "WithProjection" in (config.architectures or [""])[0] else 0
        values += tokens * width + pooled
    return values
