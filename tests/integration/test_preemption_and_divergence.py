"""Runs that end early must leave something usable: a SIGTERM checkpoints and exits 143, and the
resumed run equals an uninterrupted one (one process in-process, two with a real
`accelerate launch` where only one worker is signalled); a diverging run stops before applying a
NaN and writes no non-finite tensor anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft.cli import run
from sdft.preemption import EXIT_INTERRUPTED
from tests.integration.conftest import REPO, accelerate_launch, launch_env, sd_args

pytestmark = pytest.mark.integration
SCRIPT = "train_text_to_image.py"
# A constant LR: the schedule does not depend on --max_train_steps, so a run can be given a far
# horizon, interrupted at whatever step the signal finds it, and compared with a shorter run.
LONG = ["--max_train_steps", "1000", "--checkpointing_steps", "2", "--lr_scheduler", "constant", "--report_to", "none"]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def in_process(argv: list, capsys) -> tuple[int, str]:
    reset_accelerate()
    code = run(t2i.main, t2i.parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err


def signalled_during(micro_step: int, monkeypatch) -> None:
    """SIGTERM to this process in the middle of that micro-step (after its data is loaded, before its
    backward pass), as a scheduler's signal would land."""
    from sdft import trainer

    real = trainer.training_step

    def step_then_maybe_signal(run_state, batch, step):
        if step == micro_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run_state, batch, step)

    monkeypatch.setattr(trainer, "training_step", step_then_maybe_signal)


def interrupted_step(output: Path) -> int:
    steps = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    state = json.loads((output / f"checkpoint-{steps[-1]}" / "training_state.json").read_text())
    assert state["global_step"] == steps[-1]
    assert 1 <= steps[-1] < 1000, steps
    return steps[-1]


def assert_same_unet(a: Path, b: Path) -> None:
    wa, wb = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ"


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tiny_sd, image_folder, tmp_path,
                                                                             monkeypatch, capsys, fresh_accelerate_state):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    """The signal lands in step 2 with no checkpoint due (every 1000 steps): step 2 completes, then
    the stop writes checkpoint-2 itself."""
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    with monkeypatch.context() as patch:
        signalled_during(micro_step=1, monkeypatch=patch)
        code, err = in_process(sd_args(tiny_sd, image_folder, cut, *LONG, "--checkpointing_steps", "1000"), capsys)
    assert code == EXIT_INTERRUPTED == 143
    assert "Interrupted by a signal at step 2" in err and "--resume_from_checkpoint latest" in err
    assert interrupted_step(cut) == 2 and not (cut / "unet").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler must be removed after the run"

    until = ["--max_train_steps", "4"]
    code, _ = in_process(sd_args(tiny_sd, image_folder, cut, *LONG, *until, "--resume_from_checkpoint", "latest"),
                         capsys)
    assert code == 0
    assert in_process(sd_args(tiny_sd, image_folder, straight, *LONG, *until), capsys)[0] == 0
    assert_same_unet(straight, cut)


def worker_of_rank(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if SCRIPT in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_sd, image_folder, tmp_path):
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(REPO / SCRIPT),
               *map(str, sd_args(tiny_sd, image_folder, cut, *LONG, "--checkpointing_steps", "1"))]
    launcher = subprocess.Popen(command, cwd=REPO, env=launch_env({"ACCELERATE_USE_CPU": "1"}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint-1").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-4000:]
        time.sleep(0.05)
    worker_of_rank(psutil.Process(launcher.pid), rank=1).send_signal(signal.SIGTERM)   # rank 0 is not told
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    assert "Received SIGTERM" in output and "--resume_from_checkpoint latest" in output, output[-4000:]
    step = interrupted_step(cut)
    assert {p.name for p in (cut / f"checkpoint-{step}").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}, "both processes must have saved the same step"

    until = ["--max_train_steps", str(step + 1)]
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, cut, *LONG, *until, "--resume_from_checkpoint",
                                      "latest"), num_processes=2)
    accelerate_launch(SCRIPT, sd_args(tiny_sd, image_folder, straight, *LONG, *until), num_processes=2)
    assert_same_unet(straight, cut)


def non_finite_tensors(output: Path) -> list[str]:
    found = []
    for path in output.rglob("*"):
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        elif path.suffix == ".bin":
            tensors = flatten(torch.load(path, map_location="cpu", weights_only=False))
        else:
            continue
        found += [f"{path}:{key}" for key, t in tensors.items()
                  if t.is_floating_point() and not torch.isfinite(t).all()]
    return found


def flatten(value, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    return {k: t for key, item in items for k, t in flatten(item, f"{prefix}.{key}").items()}


def test_a_diverging_run_stops_before_the_nan_step_and_writes_nothing_non_finite(
        tiny_sd, image_folder, tmp_path, monkeypatch, capsys, caplog, fresh_accelerate_state):
    """lr 1e6 ruins the weights in one step: every later loss is NaN. Step 2's is skipped
    (--skip_nan_steps 1) and still counts (checkpoint-2 is written), step 3's stops the run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code, err = in_process(sd_args(tiny_sd, image_folder, out, "--learning_rate", "1e6", "--max_train_steps", "20",
                                   "--checkpointing_steps", "2", "--skip_nan_steps", "1", "--use_ema"), capsys)
    assert code == 1
    assert "Step 3: the loss" in err and "not finite" in err and "--learning_rate" in err
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in err
    assert "Step 2: non-finite loss; skipped the update (1 of --skip_nan_steps 1)" in caplog.text
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["skipped_steps"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()
    assert non_finite_tensors(out) == []
    assert list(out.rglob("*.safetensors")) and list(out.rglob("optimizer.bin")), "the scan found nothing to scan"
