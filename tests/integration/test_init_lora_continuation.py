"""--init_lora continues a previous run's adapter; only --resume_from_checkpoint also continues its optimizer.

What "continue" means, precisely: --init_lora copies the adapter weights of the file and nothing else. The
optimizer starts fresh (Adam's moments at zero, its step count at 0), the LR schedule starts again at step 0
(warmup included), the global step is 0 and the data order is that of epoch 0 of --seed. So 3 steps + 3
steps from the 3-step file differ from 6 straight steps. --resume_from_checkpoint restores the optimizer,
the scheduler, the step and the data position as well, and 3 + 3 steps equal 6 straight steps exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft.cli import run
from sdft.lora import WEIGHT_NAME
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration
COMMON = ["--report_to", "none", "--learning_rate", "1e-2", "--use_lora", "--lora_targets", "attn-mlp",
          "--lr_scheduler", "constant"]


def adam_steps(checkpoint) -> set[int]:
    """The step count Adam keeps per parameter in a checkpoint's optimizer state."""
    state = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
    return {int(s["step"]) for s in state.values()}


def test_init_lora_continues_the_weights_and_resume_also_the_optimizer(tiny_sd, image_folder, tmp_path):
    straight, resumed, continued = tmp_path / "straight", tmp_path / "resumed", tmp_path / "continued"
    argv = sd_args(tiny_sd, image_folder, straight, *COMMON, "--max_train_steps", "6", "--checkpointing_steps", "3")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    six = load_file(str(straight / WEIGHT_NAME))
    assert adam_steps(straight / "checkpoint-3") == {3}

    resumed.mkdir()   # 3 + 3 with the optimizer, scheduler and data position of the checkpoint: exactly 6
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    argv = sd_args(tiny_sd, image_folder, resumed, *COMMON, "--max_train_steps", "6", "--checkpointing_steps", "3",
                   "--resume_from_checkpoint", "latest")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    again = load_file(str(resumed / WEIGHT_NAME))
    assert six.keys() == again.keys() and all(torch.equal(six[k], again[k]) for k in six)
    assert adam_steps(resumed / "checkpoint-6") == {6}

    # 3 + 3 from the step-3 file alone: the weights continue, the optimizer starts again from step 0.
    argv = sd_args(tiny_sd, image_folder, continued, *COMMON, "--max_train_steps", "3", "--checkpointing_steps", "3",
                   "--init_lora", straight / "checkpoint-3" / WEIGHT_NAME)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    assert adam_steps(continued / "checkpoint-3") == {3}     # counted from 0, where the resumed run counts 6
    other = load_file(str(continued / WEIGHT_NAME))
    assert six.keys() == other.keys()
    assert max((six[k] - other[k]).abs().max().item() for k in six) > 1e-4
