"""Several processes, launched the way users launch them: FSDP2 across 2 CPU processes (gloo) with
`accelerate launch --use_fsdp --fsdp_version 2` (the checkpoint is sharded, a resumed run equals an
uninterrupted one exactly, and the exports equal what DDP writes for the same steps), and two
"machines" on this host (`--num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1`), each
with its own output folder. Launches run one at a time (the two machines of a multi-machine run
together), under 3 GiB."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdft.errors import CliError
from tests.integration.conftest import REPO, launch_command, launch_env, sd_args

pytestmark = pytest.mark.integration
SCRIPT = "train_text_to_image.py"
FSDP2 = ("--use_fsdp", "--fsdp_version", "2")
DDP = ("--multi_gpu",)
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
LORA = Path("pytorch_lora_weights.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(engine: tuple[str, ...], args: list) -> str:
    """One 2-process launch; returns its log."""
    return launch_together([launch_command(SCRIPT, args, num_processes=2, engine=(*engine, "--main_process_port", "0"))])[0]


def launch_machines(args_per_machine: list[list]) -> list[str]:
    """One run on two "machines" of one process each, started together on this host."""
    port = str(free_port())
    return launch_together([
        launch_command(SCRIPT, args, num_processes=2, num_machines=2, engine=(
            "--multi_gpu", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port))
        for rank, args in enumerate(args_per_machine)])


def launch_together(commands: list[list[str]]) -> list[str]:
    started = [subprocess.Popen(command, cwd=REPO, env=launch_env({"ACCELERATE_USE_CPU": "1"}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for command in commands]
    logs = [process.communicate(timeout=600)[0] for process in started]
    for process, log in zip(started, logs):
        assert process.returncode == 0, log[-6000:]
    return logs


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_fsdp2_and_two_machines_checkpoint_resume_exactly_and_export_what_ddp_writes(tiny_sd, image_folder, tmp_path):
    full, ddp, lora, ddp_lora, resumed = (tmp_path / name for name in ("full", "ddp", "lora", "ddp_lora", "resumed"))
    # lr 1e-4: AdamW divides by sqrt(v), which turns last-bit differences between a reduce-scatter and an
    # all-reduce of near-zero gradients into weight differences proportional to the learning rate.
    steps = ["--max_train_steps", "4", "--learning_rate", "1e-4"]
    lora_steps = ["--max_train_steps", "3", "--use_lora", "--rank", "4"]
    log = launch(FSDP2, sd_args(tiny_sd, image_folder, full, *steps, "--checkpointing_steps", "2"))
    assert "FSDP2 on CPU processes (gloo)" in log and "engine = fsdp" in log
    launch(DDP, sd_args(tiny_sd, image_folder, ddp, *steps))

    # The checkpoint holds accelerate's sharded model and optimizer: one file per rank each.
    checkpoint = full / "checkpoint-2"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Exports are gathered from the shards: the whole UNet, equal to DDP's within 1e-6.
    assert max_difference(full / UNET, ddp / UNET) <= 1e-6

    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "unet"))
    launch(FSDP2, sd_args(tiny_sd, image_folder, resumed, *steps, "--checkpointing_steps", "2",
                          "--resume_from_checkpoint", "latest"))
    launch(FSDP2, sd_args(tiny_sd, image_folder, lora, *lora_steps, "--checkpointing_steps", "2"))
    lora_resumed = tmp_path / "lora_resumed"
    shutil.copytree(lora, lora_resumed, ignore=shutil.ignore_patterns(LORA.name))
    launch(FSDP2, sd_args(tiny_sd, image_folder, lora_resumed, *lora_steps, "--checkpointing_steps", "2",
                          "--resume_from_checkpoint", "latest"))
    assert max_difference(lora / LORA, lora_resumed / LORA) == 0.0
    assert max_difference(full / UNET, resumed / UNET) == 0.0

    # Two machines, each with its own output folder: each keeps complete checkpoints and its own cache.
    machines = [tmp_path / f"machine{rank}" for rank in (0, 1)]
    cached = [*steps, "--checkpointing_steps", "2", "--cache_latents_to_disk"]
    logs = launch_machines([sd_args(tiny_sd, image_folder, folder, *cached) for folder in machines])
    assert "is not shared between the machines" in logs[0] + logs[1]
    for folder in machines:
        assert {"scheduler.bin", "optimizer.bin", "unet"} <= {p.name for p in (folder / "checkpoint-2").iterdir()}
        assert any((folder / "cache" / "latents").rglob("*.safetensors"))
    again = [tmp_path / f"again{rank}" for rank in (0, 1)]
    for folder, copy in zip(machines, again):
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint-4", "unet"))
    launch_machines([sd_args(tiny_sd, image_folder, folder, *cached, "--resume_from_checkpoint", "latest")
                     for folder in again])
    launch(DDP, sd_args(tiny_sd, image_folder, ddp_lora, *lora_steps))
    assert max_difference(machines[0] / UNET, again[0] / UNET) == 0.0
    assert max_difference(lora / LORA, ddp_lora / LORA) <= 1e-6

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(full)
    pipe.load_lora_weights(lora)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0


def test_a_sharded_run_refuses_what_it_cannot_do_before_loading_a_model(tiny_sd, image_folder, tmp_path,
                                                                         monkeypatch, capsys):
    import train_text_to_image

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises((CliError, SystemExit)):
        train_text_to_image.parse_args(list(map(str, sd_args(tiny_sd, image_folder, tmp_path / "out", "--use_lora",
                                                              "--validation_split", "0.25"))))
    message = capsys.readouterr().err
    assert "DeepSpeed ZeRO-3" in message and "--validation_split" in message and "--use_lora" in message
