"""benchmarks/bench_train.py reads the trainer's own timers (sdft.run_stats.RunStats): one timing system."""

import sys
from array import array
from pathlib import Path

import pytest
import torch

from sdft.run_stats import PHASES, RunStats

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_train  # noqa: E402


def filled_stats() -> RunStats:
    """Four optimizer steps as the loop would record them: a slow first step, then 0.5 s steps."""
    per_step = {"data": [0.5, 0.1, 0.05, 0.05], "vae": [0.5, 0.1, 0.05, 0.05], "text": [0.0] * 4,
                "denoiser": [3.0, 0.6, 0.3, 0.3], "optimizer": [2.0, 0.2, 0.1, 0.1]}
    stats = RunStats(enabled=True, device=torch.device("cpu"), started=1000.0)
    stats.step_phase_s = {phase: array("d", per_step[phase]) for phase in PHASES}
    stats.step_s = [sum(per_step[phase][i] for phase in PHASES) for i in range(4)]  # 6.0, 1.0, 0.5, 0.5
    stats.first_step_at, stats.last_step_at = 1020.0, 1030.0
    return stats


def test_step_figures_come_from_run_stats():
    figures = bench_train.step_figures(filled_stats(), warmup=2, main_start=1010.0, build_s=3.0)
    assert figures["steps_per_s"] == 2.0 and figures["s_per_step"] == 0.5
    assert figures["share"] == {"data": 0.1, "vae": 0.1, "text": 0.0, "denoiser": 0.6, "optimizer": 0.2}
    assert figures["s_per_step_by_phase"]["denoiser"] == 0.3
    assert figures["first_step_s_from_process_start"] == 17.0   # 1020 - 1000, less the 3 s model build
    assert figures["first_step_s_from_train_call"] == 10.0
    # The 10 s from main() to the end of the first step: 4 s before the first batch, then the step's phases.
    assert figures["first_step_s_by_phase"] == {"build": 4.0, "data": 0.5, "vae": 0.5, "text": 0.0,
                                                "denoiser": 3.0, "optimizer": 2.0}


def test_warmup_steps_are_left_out():
    assert bench_train.step_figures(filled_stats(), warmup=1, main_start=1010.0)["steps_per_s"] == 1.5
    with pytest.raises(RuntimeError, match="4 optimizer steps"):
        bench_train.step_figures(filled_stats(), warmup=4, main_start=1010.0)


def test_the_benchmark_patches_nothing():
    """The old wrappers (Accelerator.backward, clip_grad_norm_, the optimizer step hooks, a timed family
    subclass) timed the same steps a second way; RunStats is now the only timer."""
    source = (BENCHMARKS / "bench_train.py").read_text()
    for patch in ("setattr(", "register_optimizer_step", "Accelerator", "monkeypatch"):
        assert patch not in source
