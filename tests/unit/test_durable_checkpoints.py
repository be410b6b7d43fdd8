"""Durable checkpoints: a manifest in each, everything fsynced before the rename, `latest` skips
checkpoints that fail the manifest check, and a process killed (SIGKILL) during a save leaves
every visible checkpoint complete."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdft import checkpointing
from sdft.checkpointing import MANIFEST_FILE, Checkpointer, Position, TrainedWeights, incomplete_files, resolve_resume
from sdft.guards import NonFiniteError
from tests.unit.test_checkpointing import tiny_unet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def saved(accelerator, tmp_path):
    """An output folder with checkpoint-2 and checkpoint-4 written by Checkpointer.save."""
    unet = accelerator.prepare(tiny_unet())
    weights = TrainedWeights(StableDiffusionPipeline, {"unet": accelerator.unwrap_model(unet)}, lora=False)
    checkpointer = Checkpointer(accelerator, tmp_path / "out", total_limit=None, weights=weights)
    for step in (2, 4):
        checkpointer.save(Position(global_step=step, seed=0))
    return tmp_path / "out", checkpointer


def test_manifest_lists_every_file_and_everything_is_fsynced_before_the_rename(saved, monkeypatch):
    output, checkpointer = saved
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    final = checkpointer.save(Position(global_step=6, seed=0))

    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    manifest = json.loads((final / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == [f for f in files if f != MANIFEST_FILE]
    assert {"unet/diffusion_pytorch_model.safetensors", "training_state.json", "random_states_0.pkl"} <= set(manifest)
    rename = events.index(("replace", str(output / ".checkpoint-6.partial")))
    synced = {Path(path) for kind, path in events[:rename] if kind == "fsync"}
    partial = output / ".checkpoint-6.partial"
    expected = {partial / name for name in files} | {partial, partial / "unet"}
    assert expected <= synced, f"not fsynced before the rename: {sorted(expected - synced)}"
    assert ("fsync", str(output)) in events[rename:], "the output folder was not fsynced after the rename"


def test_latest_skips_incomplete_checkpoints_with_a_warning(saved, caplog):
    output, _ = saved
    weights = output / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])     # a flush the disk never did
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", output) == output / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "diffusion_pytorch_model.safetensors" in caplog.text
    # Asked for by name, an incomplete checkpoint is an error naming what is wrong.
    with pytest.raises(FileNotFoundError, match="checkpoint-4.*incomplete.*safetensors"):
        resolve_resume("checkpoint-4", output)
    (output / "checkpoint-2" / "training_state.json").unlink()
    (output / "checkpoint-4" / MANIFEST_FILE).unlink()
    assert incomplete_files(output / "checkpoint-2") == ["training_state.json is missing"]
    # Without a manifest (diffusers' scripts write none) a checkpoint is trusted as it is.
    assert resolve_resume("latest", output) == output / "checkpoint-4"


def test_non_finite_weights_are_never_saved(saved):
    output, checkpointer = saved
    with torch.no_grad():
        next(checkpointer.weights.modules["unet"].parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="checkpoint-6.*not finite"):
        checkpointer.save(Position(global_step=6, seed=0))
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4"]


STALLING_SAVE = """
import sys, time
from pathlib import Path
from accelerate import Accelerator
from diffusers import UNet2DModel
from sdft.checkpointing import Checkpointer, Position, TrainedWeights

class StallingWeights(TrainedWeights):
    def save(self, directory, **kwargs):
        super().save(directory, **kwargs)                  # the weights are written, the save is not finished
        (Path(sys.argv[1]) / "stalled").write_text("")
        time.sleep(600)

accelerator = Accelerator(cpu=True)
unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
modules = {"unet": accelerator.prepare(unet)}
Checkpointer(accelerator, sys.argv[1], None, TrainedWeights(None, modules, lora=False)).save(
    Position(global_step=2, seed=0))
Checkpointer(accelerator, sys.argv[1], None, StallingWeights(None, modules, lora=False)).save(
    Position(global_step=4, seed=0))
"""


def test_sigkill_during_a_save_leaves_every_visible_checkpoint_complete(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    process = subprocess.Popen([sys.executable, "-c", STALLING_SAVE, str(output)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / "stalled").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the save never reached its stall"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()

    assert (output / ".checkpoint-4.partial" / "unet").is_dir(), "the kill did not land inside the save"
    visible = checkpointing.list_checkpoints(output)
    assert [path.name for _, path in visible] == ["checkpoint-2"]
    assert all((path / MANIFEST_FILE).is_file() and incomplete_files(path) == [] for _, path in visible)
    assert resolve_resume("latest", output) == output / "checkpoint-2"
