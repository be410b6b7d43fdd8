"""Exponential moving average of the trained weights, on top of diffusers' `EMAModel`.

One average per trained model (the denoiser, and each text encoder a full fine-tune trains, issue
16), by role. Adds what the scripts need around them: optional offload of the shadow weights to
pinned CPU memory between updates (moved to the training device, not a hard-coded "cuda"),
swapping the EMA weights in for validation and export, and save/load in checkpoints: the
`<role>_ema/` diffusers-model layout of the diffusers scripts for a diffusers model (the denoiser),
and for a transformers text encoder (which `EMAModel.save_pretrained` cannot rebuild: it calls
diffusers' `from_config`) the shadow weights by parameter name in `<role>_ema/ema.safetensors`
with the averaging state beside them in `ema_state.json`.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

WEIGHTS_NAME, STATE_NAME = "ema.safetensors", "ema_state.json"


class EMA:
    def __init__(self, models: dict[str, torch.nn.Module], device: torch.device,
                 foreach: bool = False, offload: bool = False, decay: float = 0.9999):
        """`models`: the starting weights of each trained model, by role."""
        self.device = device
        self.foreach = foreach
        # Offloading only saves memory when training happens on an accelerator.
        self.offload = offload and device.type != "cpu"
        self.model_cls = {role: type(model) for role, model in models.items()}
        self.names = {role: [name for name, _ in model.named_parameters()] for role, model in models.items()}
        self.averages = {role: EMAModel(model.parameters(), model_cls=type(model), model_config=model.config,
                                        foreach=foreach, decay=decay) for role, model in models.items()}
        for average in self.averages.values():
            # An fp32 average even of bf16 weights (--full_bf16): a decay of 0.9999 moves it by 1e-4 of
            # the difference per step, which bf16's 8-bit mantissa would round away.
            average.to(dtype=torch.float32)
            self._park(average)

    @property
    def roles(self) -> list[str]:
        return list(self.averages)

    def _park(self, average: EMAModel) -> None:
        if self.offload:
            average.to("cpu")
            average.pin_memory()
        else:
            average.to(self.device)

    def step(self, modules: dict[str, torch.nn.Module]) -> None:
        for role, average in self.averages.items():
            if self.offload:
                average.to(self.device, non_blocking=True)
            average.step(modules[role].parameters())
            if self.offload:
                average.to("cpu", non_blocking=True)

    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for role, average in self.averages.items():
            average.copy_to(modules[role].parameters())

    @contextmanager
    def swapped_in(self, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
        """Run a block (validation) with the EMA weights in every averaged model, then put the trained ones back."""
        with ExitStack() as stack:
            for role, average in self.averages.items():
                stack.enter_context(swapped(average, modules[role]))
            yield

    def save(self, directory: Path) -> None:
        for role, average in self.averages.items():
            folder = directory / f"{role}_ema"
            if issubclass(self.model_cls[role], ModelMixin):
                average.save_pretrained(str(folder))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            state = average.state_dict()
            shadow = state.pop("shadow_params")
            save_file({name: p.detach().to("cpu").contiguous() for name, p in zip(self.names[role], shadow)},
                      str(folder / WEIGHTS_NAME))
            (folder / STATE_NAME).write_text(json.dumps(state, indent=1))

    def load(self, directory: Path) -> None:
        for role, average in self.averages.items():
            folder = directory / f"{role}_ema"
            if issubclass(self.model_cls[role], ModelMixin):
                state = EMAModel.from_pretrained(str(folder), self.model_cls[role], foreach=self.foreach).state_dict()
            else:
                weights = load_file(str(folder / WEIGHTS_NAME))
                state = {**json.loads((folder / STATE_NAME).read_text()),
                         "shadow_params": [weights[name] for name in self.names[role]]}
            average.load_state_dict(state)
            average.to(dtype=torch.float32)
            self._park(average)


@contextmanager
def swapped(average: EMAModel, model: torch.nn.Module) -> Iterator[None]:
    average.store(model.parameters())
    average.copy_to(model.parameters())
    try:
        yield
    finally:
        average.restore(model.parameters())
