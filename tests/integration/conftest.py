"""Fixtures for real training runs: a tiny SD model and image set built offline, and a helper that
runs a training script with `accelerate launch` the way a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdft.tiny import build_sd, make_images

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", num_images=8, layout="metadata")


def launch_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def launch_command(script: str, args: list[str], *, num_processes: int = 1, mixed_precision: str = "no",
                   engine: tuple[str, ...] = ("--multi_gpu",), num_machines: int = 1) -> list[str]:
    """`engine`: the launcher's flags for several processes (DDP by default; e.g. ("--use_fsdp", ...))."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", str(num_machines), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if num_processes > 1:
        command += list(engine)
    return command + [str(REPO / script), *map(str, args)]


def accelerate_launch(script: str, args: list[str], *, num_processes: int = 1, mixed_precision: str = "no",
                      check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    command = launch_command(script, args, num_processes=num_processes, mixed_precision=mixed_precision)
    extra = {"ACCELERATE_USE_CPU": "1"} if num_processes > 1 else {}
    result = subprocess.run(command, cwd=REPO, env=launch_env({**extra, **(env or {})}),
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def sd_args(model: Path, data: Path, output: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output,
            "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--seed", "0", *extra]


def generate(pipe, prompt: str = "a red circle on a blue background", **kwargs) -> np.ndarray:
    """One seeded 32x32 image in 2 steps, as an array."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np",
                **kwargs).images[0]
