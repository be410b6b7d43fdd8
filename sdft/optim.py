"""Optimizers and learning-rate schedules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant"]
OPTIMIZERS = ("adamw", "prodigy", "adafactor")   # --optimizer, case-insensitive


@dataclass(frozen=True)
class AdamSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit: bool = False


def build_adamw(param_groups: list[dict], settings: AdamSettings) -> torch.optim.Optimizer:
    """`param_groups` are torch param groups; groups may override lr and weight_decay."""
    kwargs = {"lr": settings.lr, "betas": settings.betas, "weight_decay": settings.weight_decay, "eps": settings.eps}
    if settings.use_8bit:
        import bitsandbytes as bnb  # imported lazily: a heavy import that only this path needs

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # One fused kernel per step instead of a loop over tensors: 2-3x faster full fine-tuning steps
    # where the optimizer dominates (benchmarks/README.md: 64% of an SD-1.5 UNet step on the CPU).
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point()
                for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, fused=fused, **kwargs)


def scaled_lr(lr: float, gradient_accumulation_steps: int, batch_size: int, num_processes: int) -> float:
    """--scale_lr: keep the per-sample step size when the effective batch grows."""
    return lr * gradient_accumulation_steps * batch_size * num_processes


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_processes: int, num_cycles: int = 1, power: float = 1.0):
    """Step counts are in optimizer steps. accelerate's prepared scheduler advances `num_processes`
    times per optimizer step (diffusers PR #8312), so both counts are scaled by it here, in one
    place, for every script (upstream SDXL scales by accumulation steps instead: #9633)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, num_cycles=num_cycles, power=power)


@dataclass(frozen=True)
class ProdigySettings:
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    beta3: float | None = None
    weight_decay: float = 1e-4
    eps: float = 1e-8
    decouple: bool = True
    use_bias_correction: bool = True
    safeguard_warmup: bool = True


def build_prodigy(param_groups: list[dict], settings: ProdigySettings) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, arXiv 2306.06101): AdamW with an estimated step size."""
    import prodigyopt  # optional dependency, imported only when asked for

    return prodigyopt.Prodigy(param_groups, lr=settings.lr, betas=settings.betas, beta3=settings.beta3,
                              weight_decay=settings.weight_decay, eps=settings.eps, decouple=settings.decouple,
                              use_bias_correction=settings.use_bias_correction,
                              safeguard_warmup=settings.safeguard_warmup)


@dataclass(frozen=True)
class AdafactorSettings:
    lr: float
    weight_decay: float = 0.0
    clip_threshold: float = 1.0
    decay_rate: float = -0.8


def build_adafactor(param_groups: list[dict], settings: AdafactorSettings) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): factored second moments (a row and a column
    vector per matrix instead of a full tensor) and no first moment, so its state is a small fraction
    of AdamW's 8 bytes per parameter. Its own relative step size, parameter scaling and warmup are
    off: the learning rate is ours, set by the LR schedule like any other optimizer's."""
    from transformers.optimization import Adafactor

    return Adafactor(param_groups, lr=settings.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=settings.weight_decay, clip_threshold=settings.clip_threshold,
                     decay_rate=settings.decay_rate)
