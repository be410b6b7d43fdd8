"""Three SD 1.x runs in one `accelerate launch --num_processes 2` (tests/integration/test_optimizers.py
starts it; one launch instead of three saves the start-up of six processes):

    plain    6 steps, DDP averages the gradients after the backward pass
    fused    6 steps, --fused_backward_pass (the hooks average them), a checkpoint at step 3
    resumed  the fused run again from its checkpoint-3

usage: fused_two_process.py OUT_DIR TRAINING_FLAGS...
Each run ends with sdft.output's check that the processes' weights are identical."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState

import train_text_to_image as t2i
from sdft import cli
from sdft.cli import run


def train(argv: list[str]) -> None:
    try:
        code = run(t2i.main, t2i.parse_args(argv))
    finally:
        cli._FINISHED.clear()   # free the run now, while the process group it used is still alive
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if code != 0:
        raise SystemExit(code)


def main() -> None:
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    # accelerate keeps the process group of a fork launch at the end of a run, so the next run reuses it.
    os.environ["FORK_LAUNCHED"] = "1"
    train([*flags, "--output_dir", str(out / "plain"), "--max_grad_norm", "1000"])
    train([*flags, "--output_dir", str(out / "fused"), "--fused_backward_pass"])
    if dist.get_rank() == 0:
        shutil.copytree(out / "fused" / "checkpoint-3", out / "resumed" / "checkpoint-3")
    dist.barrier()
    train([*flags, "--output_dir", str(out / "resumed"), "--fused_backward_pass", "--resume_from_checkpoint", "latest"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
