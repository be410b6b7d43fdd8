"""Several processes, launched the way users launch them: FSDP2 across 2 CPU processes (gloo) with
`accelerate launch --use_fsdp --fsdp_version 2` (the checkpoint is sharded, a resumed run equals an
uninterrupted one exactly, and the exports equal what DDP writes for the same steps), and two
"machines" on this host (`--num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1`), each
with its own output folder. At most two launches run at a time (about 3 GiB)."""

from __future__ import annotations

import shutil
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


def two_machines(rank: int) -> tuple[str, ...]:
    return ("--multi_gpu", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1")


def launch_together(runs: list[tuple[tuple[str, ...], list]], check: bool = True) -> list[str]:
    """Several 2-process launches at once (each on its own port, but the machines of one multi-machine
    run); returns their logs."""
    started = []
    for port, (engine, args) in enumerate(runs, start=29531):
        machines = 2 if "--machine_rank" in engine else 1
        port = 29541 if machines == 2 else port
        command = launch_command(SCRIPT, args, num_processes=2, engine=(*engine, "--main_process_port", str(port)),
                                 num_machines=machines)
        started.append(subprocess.Popen(command, cwd=REPO, env=launch_env({"ACCELERATE_USE_CPU": "1"}),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [process.communicate(timeout=600)[0] for process in started]
    for process, log in zip(started, logs):
        assert process.returncode == 0 or not check, log[-6000:]
    return logs


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_fsdp2_checkpoints_in_shards_resumes_exactly_and_exports_what_ddp_writes(tiny_sd, image_folder, tmp_path):
    full, ddp, lora, ddp_lora, resumed = (tmp_path / name for name in ("full", "ddp", "lora", "ddp_lora", "resumed"))
    # lr 1e-4: AdamW divides by sqrt(v), which turns last-bit differences between a reduce-scatter and an
    # all-reduce of near-zero gradients into weight differences proportional to the learning rate.
    steps = ["--max_train_steps", "4", "--learning_rate", "1e-4"]
    lora_steps = ["--max_train_steps", "3", "--use_lora", "--rank", "4"]
    logs = launch_together([(FSDP2, sd_args(tiny_sd, image_folder, full, *steps, "--checkpointing_steps", "2")),
                            (DDP, sd_args(tiny_sd, image_folder, ddp, *steps))])
    assert "FSDP2 on CPU processes (gloo)" in logs[0] and "engine = fsdp" in logs[0]

    # The checkpoint holds accelerate's sharded model and optimizer: one file per rank each.
    checkpoint = full / "checkpoint-2"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Exports are gathered from the shards: the whole UNet, equal to DDP's within 1e-6.
    assert max_difference(full / UNET, ddp / UNET) <= 1e-6

    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "unet"))
    launch_together([(FSDP2, sd_args(tiny_sd, image_folder, resumed, *steps, "--checkpointing_steps", "2",
                                     "--resume_from_checkpoint", "latest")),
                     (FSDP2, sd_args(tiny_sd, image_folder, lora, *lora_steps))])
    assert max_difference(full / UNET, resumed / UNET) == 0.0

    # Two machines, each with its own output folder: each keeps complete checkpoints and its own cache.
    machines = [tmp_path / f"machine{rank}" for rank in (0, 1)]
    cached = [*steps, "--checkpointing_steps", "2", "--cache_latents_to_disk"]
    logs = launch_together([(two_machines(rank), sd_args(tiny_sd, image_folder, folder, *cached))
                            for rank, folder in enumerate(machines)])
    assert "is not shared between the machines" in logs[0] + logs[1]
    for folder in machines:
        assert {"scheduler.bin", "optimizer.bin", "unet"} <= {p.name for p in (folder / "checkpoint-2").iterdir()}
        assert any((folder / "cache" / "latents").rglob("*.safetensors"))
    again = [tmp_path / f"again{rank}" for rank in (0, 1)]
    for folder, copy in zip(machines, again):
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint-4", "unet"))
    launch_together([(two_machines(rank), sd_args(tiny_sd, image_folder, folder, *cached, "--resume_from_checkpoint",
                                                  "latest")) for rank, folder in enumerate(again)]
                    + [(DDP, sd_args(tiny_sd, image_folder, ddp_lora, *lora_steps))])
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
        train_text_to_image.parse_args(sd_args(tiny_sd, image_folder, tmp_path / "out", "--use_ema", "--use_lora"))
    message = capsys.readouterr().err
    assert "DeepSpeed ZeRO-3" in message and "--use_ema" in message and "--use_lora" in message
