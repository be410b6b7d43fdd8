"""Real 2-process `accelerate launch train_text_to_image.py` runs with aspect-ratio buckets and a
held-out validation loss: a run resumed mid-epoch under gradient accumulation ends with the
weights of the uninterrupted run and logs the same val_loss, and both processes agree."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdft.tiny import make_images
from tests.integration.conftest import accelerate_launch, sd_args

pytestmark = pytest.mark.integration
SCRIPT = "train_text_to_image.py"


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in log_dir.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            found.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return found


def test_bucketed_two_process_run_resumes_exactly_with_the_same_val_loss(tiny_sd, tmp_path):
    # 14 images of three aspect ratios; 2 held out, 12 trained on in buckets 40x24, 24x40, 32x32.
    data = make_images(tmp_path / "mixed", num_images=14, sizes=((40, 24), (24, 40), (32, 32)))
    common = ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8",
              "--validation_split", "0.15", "--validate_every_n_steps", "2", "--random_flip",
              "--gradient_accumulation_steps", "2", "--max_train_steps", "6", "--checkpointing_steps", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = accelerate_launch(SCRIPT, sd_args(tiny_sd, data, straight, *common), num_processes=2)
    log = first.stderr + first.stdout
    assert "identical on all 2 processes" in log
    assert "Aspect-ratio buckets of the training images (3 buckets)" in log
    assert "Aspect-ratio buckets of the held-out images" in log
    state = json.loads((straight / "checkpoint-3" / "training_state.json").read_text())
    assert state["epoch"] == 1 and state["batches_in_epoch"] > 0, f"checkpoint-3 is not mid-epoch: {state}"

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    accelerate_launch(SCRIPT, sd_args(tiny_sd, data, resumed, *common, "--resume_from_checkpoint", "latest"),
                      num_processes=2)

    for sub in ("checkpoint-6/unet", "unet"):
        a = load_file(straight / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{sub}: resumed weights differ"

    val, train = scalars(straight / "logs", "val_loss"), scalars(straight / "logs", "train_loss")
    assert sorted(val) == [2, 4, 6]
    again = scalars(resumed / "logs", "val_loss")
    assert sorted(again) == [4, 6] and all(again[s] == val[s] for s in again), "same seed, different val_loss"
    assert all(val[s] != train[s] for s in val), "val_loss must not be the training loss"
    best_step = min(val, key=val.get)
    for out in (straight, resumed):   # the resumed run knows the best of the steps before it, too
        card = (out / "README.md").read_text()
        match = re.search(r"Best validation loss on held-out images: ([0-9.]+) at step (\d+)\.", card)
        assert match and int(match.group(2)) == best_step and abs(float(match.group(1)) - val[best_step]) < 1e-5
