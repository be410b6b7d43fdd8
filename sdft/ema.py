"""Exponential moving average of the trained weights, on top of diffusers' `EMAModel`.

Adds what the scripts need around it: optional offload of the shadow weights to pinned CPU memory
between updates (moved to the training device, not a hard-coded "cuda"), swapping the EMA weights
in for validation, and save/load in the `<role>_ema/` layout of the diffusers scripts.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel


class EMA:
    def __init__(self, model: torch.nn.Module, role: str, device: torch.device,
                 foreach: bool = False, offload: bool = False, decay: float = 0.9999):
        self.role = role
        self.model_cls = type(model)
        self.device = device
        self.foreach = foreach
        # Offloading only saves memory when training happens on an accelerator.
        self.offload = offload and device.type != "cpu"
        self.ema = EMAModel(model.parameters(), model_cls=self.model_cls, model_config=model.config, foreach=foreach,
                            decay=decay)
        # An fp32 average even of bf16 weights (--full_bf16): a decay of 0.9999 moves it by 1e-4 of the
        # difference per step, which bf16's 8-bit mantissa would round away.
        self.ema.to(dtype=torch.float32)
        self._park()

    def _park(self) -> None:
        if self.offload:
            self.ema.to("cpu")
            self.ema.pin_memory()
        else:
            self.ema.to(self.device)

    def step(self, parameters) -> None:
        if self.offload:
            self.ema.to(self.device, non_blocking=True)
        self.ema.step(parameters)
        if self.offload:
            self.ema.to("cpu", non_blocking=True)

    def copy_to(self, parameters) -> None:
        self.ema.copy_to(parameters)

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run a block (validation) with the EMA weights in `model`, then put the trained ones back."""
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            yield
        finally:
            self.ema.restore(model.parameters())

    def save(self, directory: Path) -> None:
        self.ema.save_pretrained(str(directory / f"{self.role}_ema"))

    def load(self, directory: Path) -> None:
        loaded = EMAModel.from_pretrained(str(directory / f"{self.role}_ema"), self.model_cls, foreach=self.foreach)
        self.ema.load_state_dict(loaded.state_dict())
        self._park()
