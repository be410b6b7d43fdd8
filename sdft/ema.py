"""Exponential moving average of the trained weights, on top of diffusers' `EMAModel`.

Adds what the scripts need around it: optional offload of the shadow weights to pinned CPU memory
between updates (moved to the training device, not a hard-coded "cuda"), swapping the EMA weights
in for validation, and save/load in the `<role>_ema/` layout of the diffusers scripts.

With adapters (`adapter_only`) the average covers the trainable adapter weights only: the frozen base
is the same in the average and the model, so averaging it would only cost a second copy of the model.
Its checkpoint is `<role>_ema/adapter_ema.pt` (EMAModel's state: shadow weights and step count).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel

ADAPTER_EMA_FILE = "adapter_ema.pt"


class EMA:
    def __init__(self, model: torch.nn.Module, role: str, device: torch.device,
                 foreach: bool = False, offload: bool = False, decay: float = 0.9999, adapter_only: bool = False):
        self.role = role
        self.model_cls = type(model)
        self.device = device
        self.foreach = foreach
        self.adapter_only = adapter_only
        # Offloading only saves memory when training happens on an accelerator.
        self.offload = offload and device.type != "cpu"
        model_kwargs = {} if adapter_only else {"model_cls": self.model_cls, "model_config": model.config}
        self.ema = EMAModel(self.tracked(model.parameters()), foreach=foreach, decay=decay, **model_kwargs)
        # An fp32 average even of bf16 weights (--full_bf16): a decay of 0.9999 moves it by 1e-4 of the
        # difference per step, which bf16's 8-bit mantissa would round away.
        self.ema.to(dtype=torch.float32)
        self._park()

    def tracked(self, parameters) -> list[torch.nn.Parameter]:
        """The parameters averaged: all of them, or with adapters the trainable ones, in module order."""
        return [p for p in parameters if p.requires_grad] if self.adapter_only else list(parameters)

    def _park(self) -> None:
        if self.offload:
            self.ema.to("cpu")
            self.ema.pin_memory()
        else:
            self.ema.to(self.device)

    def step(self, parameters) -> None:
        if self.offload:
            self.ema.to(self.device, non_blocking=True)
        self.ema.step(self.tracked(parameters))
        if self.offload:
            self.ema.to("cpu", non_blocking=True)

    def copy_to(self, parameters) -> None:
        self.ema.copy_to(self.tracked(parameters))

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run a block (validation) with the EMA weights in `model`, then put the trained ones back."""
        parameters = self.tracked(model.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def save(self, directory: Path) -> None:
        folder = directory / f"{self.role}_ema"
        if self.adapter_only:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.ema.state_dict(), folder / ADAPTER_EMA_FILE)
        else:
            self.ema.save_pretrained(str(folder))

    def load(self, directory: Path) -> None:
        folder = directory / f"{self.role}_ema"
        if self.adapter_only:
            state = torch.load(folder / ADAPTER_EMA_FILE, map_location="cpu", weights_only=True)
        else:
            state = EMAModel.from_pretrained(str(folder), self.model_cls, foreach=self.foreach).state_dict()
        self.ema.load_state_dict(state)
        self._park()
