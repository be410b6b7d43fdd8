"""--torch_compile: regional compilation of the denoiser (torch.compile on each block's forward, not on
the whole model), so the first step compiles one graph per kind of block instead of the whole network:
SD3's identical transformer blocks share one compiled graph, a UNet compiles one per block class.

- Only `forward` is replaced: the module's hooks (sdft.block_swap), gradient checkpointing (diffusers
  checkpoints the block call, which runs the compiled forward) and adapters injected before (PEFT's
  LoRA layers) stay outside or inside the graph as they should; the fused backward pass's
  per-parameter hooks run on the parameters, which the compiled graph takes as inputs.
- Several bucket shapes: torch's automatic dynamic shapes. The first shape compiles with static
  sizes; the first batch of another shape compiles once more with the sizes that changed marked
  dynamic, and every later shape reuses that graph. So a run recompiles once, not once per bucket.
- The time torch spends compiling (dynamo, AOTAutograd and inductor, the lazily compiled backward
  included) is measured with torch's compile callbacks and reported apart from the step times
  (sdft.run_stats).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import torch

from sdft.block_swap import denoiser_blocks

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKEND = "inductor"   # the tests' quick runs swap in "aot_eager" (dynamo and AOTAutograd without code generation)


@dataclass
class CompileClock:
    """Seconds torch has spent compiling in this process, and how many compilations."""

    seconds: float = 0.0
    compiles: int = 0
    _started: float | None = None

    def started(self, _args) -> None:
        self._started = time.perf_counter()

    def ended(self, _args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.compiles += 1
            self._started = None


_clock: CompileClock | None = None


def compile_clock() -> CompileClock:
    """torch's compile callbacks are process-wide, so is the clock: registered once, read as deltas."""
    from torch._dynamo.callback import callback_handler

    global _clock
    if _clock is None:
        _clock = CompileClock()
    if _clock.started not in callback_handler.start_callbacks:   # torch._dynamo.reset() clears them
        callback_handler.register_start_callback(_clock.started)
        callback_handler.register_end_callback(_clock.ended)
    return _clock


def missing_compiler(device: torch.device) -> str | None:
    """Inductor builds C++ kernels for the CPU; without a compiler the first step would fail deep in torch."""
    if device.type != "cpu":
        return None
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    if any(name and shutil.which(name) for name in names) or shutil.which("g++") or shutil.which("clang++"):
        return None
    return "--torch_compile needs a C++ compiler on the CPU (inductor builds its kernels with it); install g++."


def compile_blocks(denoiser: torch.nn.Module, mode: str) -> int:
    """Compile each block's forward in place; returns how many blocks."""
    blocks = denoiser_blocks(denoiser)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=BACKEND, mode=None if mode == "default" else mode)
    return len(blocks)
