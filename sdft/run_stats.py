"""What a training run cost: throughput, time to first step, peak memory and where step time went.

`RunStats` is a lap timer: the loop calls `lap(phase)` after each part of a step, and the time
since the previous lap is charged to that phase; `batches(loader)` charges the wait for each
batch to "data". Laps are only taken on the main process (`enabled`), and on CUDA each lap
synchronises first, because kernels run asynchronously and an unsynchronised clock would charge
a phase's GPU time to whichever phase happens to wait for it. That costs a few synchronisations
per step (the GPU's queue drains at each), so timing is off on the other processes.

Step time is the sum of the phases (data, VAE, text encoders, denoiser, optimizer), so logging,
checkpoints and validation count in the wall time but not in steps/s; with --torch_compile the
steps that compiled are left out of the steady rates too, and the compile time is reported apart.
Each step's phase times are kept too (`step_phase_s`, 40 bytes a step), so a reader such as
benchmarks/bench_train.py can leave out any number of warm-up steps and break the first step down.
So is the process's resident memory at the end of each step (`step_rss`, read from /proc; 8 bytes a
step): memory that climbs from step to step shows there, where the peak alone would not say when it
was reached.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

PHASES = ("data", "vae", "text", "denoiser", "optimizer")
PHASE_NAMES = {"data": "data loading", "vae": "VAE", "text": "text encoders",
               "denoiser": "denoiser forward+backward", "optimizer": "optimizer"}


def process_start() -> float:
    """When this process started, on the time.time() clock (Linux /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def batch_size(batch: dict) -> int:
    for key in ("captions", "names"):
        if isinstance(batch.get(key), list):
            return len(batch[key])
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


@dataclass
class RunStats:
    enabled: bool
    device: torch.device
    num_processes: int = 1
    started: float = field(default_factory=process_start)
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    step_s: list[float] = field(default_factory=list)    # per optimizer step, the sum of its phases
    step_phase_s: dict[str, array] = field(default_factory=lambda: {p: array("d") for p in PHASES})  # per step
    images: int = 0
    sample_set_s: list[float] = field(default_factory=list)   # wall time of each in-run sample set
    step_rss: array = field(default_factory=lambda: array("d"))   # bytes resident at the end of each step
    first_step_at: float | None = None
    compile_clock: object | None = None   # sdft.regional_compile.CompileClock with --torch_compile
    compile_s: float = 0.0                 # compiling during this run's steps (also inside step_s)
    compile_steps: set[int] = field(default_factory=set)   # steps that compiled: left out of steady rates
    last_step_at: float | None = None    # time.time() at the end of the latest optimizer step
    _lap_start: float = 0.0
    _compile_mark: float = 0.0
    _step_start: float = 0.0
    _this_step: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @classmethod
    def off(cls) -> "RunStats":
        return cls(enabled=False, device=torch.device("cpu"))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def batches(self, loader: Iterable[dict]) -> Iterator[dict]:
        """Yield the loader's batches, charging the wait for each to "data"."""
        iterator = iter(loader)
        while True:
            start = self._now() if self.enabled else 0.0
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if self.enabled:
                self._lap_start = self._now()
                self._charge("data", self._lap_start - start)
                self._step_start = self._step_start or start
                self.images += batch_size(batch) * self.num_processes
            yield batch

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self._charge(phase, now - self._lap_start)
            self._lap_start = now

    def _charge(self, phase: str, seconds: float) -> None:
        self.phase_s[phase] += seconds
        self._this_step[phase] += seconds

    def end_step(self) -> None:
        """After an optimizer step (all its accumulation micro-steps) is complete."""
        if not self.enabled:
            return
        self.step_s.append(self._lap_start - self._step_start)
        self._count_compiling()
        self._step_start = 0.0
        for phase, seconds in self._this_step.items():
            self.step_phase_s[phase].append(seconds)
        self._this_step = dict.fromkeys(PHASES, 0.0)
        self.last_step_at = time.time()
        self.step_rss.append(resident_bytes())
        if self.first_step_at is None:
            self.first_step_at = self.last_step_at

    def watch_compiling(self, clock) -> None:
        """Charge compile time from now on (a clock with `seconds`, see sdft.regional_compile)."""
        self.compile_clock, self._compile_mark = clock, clock.seconds

    def _count_compiling(self) -> None:
        if self.compile_clock is None:
            return
        spent = self.compile_clock.seconds - self._compile_mark
        if spent > 0:
            self.compile_s += spent
            self.compile_steps.add(len(self.step_s) - 1)
            self._compile_mark = self.compile_clock.seconds

    def sampled(self, seconds: float) -> None:
        """A sample set took `seconds` (wall time, not part of any step)."""
        if self.enabled:
            self.sample_set_s.append(seconds)

    def summary(self) -> dict[str, str]:
        """Headline numbers, formatted; steady rates leave out the first step (compilation, warm-up)."""
        steps = len(self.step_s)
        wall = time.time() - self.started
        out = {"steps": str(steps), "images seen": str(self.images), "wall time": f"{wall:.1f} s"}
        if self.first_step_at is not None:
            out["time to first step"] = f"{self.first_step_at - self.started:.1f} s"
        if self.compile_clock is not None:
            out["compile time"] = f"{self.compile_s:.1f} s in {len(self.compile_steps)} step(s), left out of steady rates"
        steady_steps = [s for i, s in enumerate(self.step_s) if i > 0 and i not in self.compile_steps]
        steady = sum(steady_steps)
        if steady_steps and steady > 0:
            per_step = self.images / steps
            out["steady steps/s"] = f"{len(steady_steps) / steady:.2f}"
            out["steady images/s"] = f"{len(steady_steps) * per_step / steady:.1f}"
        if self.sample_set_s:
            count, total_s = len(self.sample_set_s), sum(self.sample_set_s)
            out["sample sets"] = f"{count}, {total_s / count:.1f} s each, {total_s:.1f} s in all"
        out["peak memory"] = peak_memory(self.device)
        if self.step_rss and self.step_rss[0] > 0:
            out["resident at step ends"] = step_rss_text(self.step_rss)
        total = sum(self.phase_s.values())
        if total > 0:
            out["step time"] = ", ".join(f"{PHASE_NAMES[p]} {100 * s / total:.0f}%" for p, s in self.phase_s.items())
        return out

    def log_summary(self) -> dict[str, str]:
        summary = self.summary() if self.enabled else {}
        if summary:
            logger.info("***** Run summary *****")
            for key, value in summary.items():
                logger.info("  %s: %s", key, value)
        return summary


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc/self/statm; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def step_rss_text(step_rss: array, shown: int = 8) -> str:
    """ "8.12, 8.15, 8.15 GiB (steps 1-3)"; a long run shows its first and last steps and its maximum."""
    gib = [value / 2**30 for value in step_rss]
    if len(gib) <= shown:
        return f"{', '.join(f'{v:.2f}' for v in gib)} GiB (steps 1-{len(gib)})"
    head, tail = gib[:shown // 2], gib[-(shown // 2):]
    return (f"{', '.join(f'{v:.2f}' for v in head)} ... {', '.join(f'{v:.2f}' for v in tail)} GiB "
            f"(steps 1-{len(gib)}; max {max(gib):.2f} at step {gib.index(max(gib)) + 1})")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated"
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**30:.2f} GiB peak RSS"
