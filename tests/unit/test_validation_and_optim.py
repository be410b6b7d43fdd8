"""Validation prompts and images; learning rate scaling and schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdft.optim import AdamSettings, build_adamw, build_lr_scheduler, scaled_lr
from sdft.validation import ValidationPlan, plan_prompts, save_images

# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("prompt_list, prompt, num_images, expected", [
    (None, None, 4, []),
    ([], None, 4, []),
    (["a cat", "a dog"], None, 4, ["a cat", "a dog"]),           # --validation_prompts: each once
    (None, "a fox", 3, ["a fox", "a fox", "a fox"]),               # --validation_prompt x --num_validation_images
    (None, "a fox", 0, []),
    (["a cat"], "a fox", 2, ["a cat", "a fox", "a fox"]),
])
def test_plan_prompts(prompt_list, prompt, num_images, expected):
    assert plan_prompts(prompt_list, prompt, num_images) == expected
    assert ValidationPlan(plan_prompts(prompt_list, prompt, num_images), seed=0).enabled == bool(expected)


def test_plan_prompts_does_not_alias_the_flag_value():
    flag_value = ["a cat"]
    plan_prompts(flag_value, "a fox", 1).append("x")
    assert flag_value == ["a cat"]


def test_save_images_writes_pngs_and_prompts(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a cat", "a dog", "a cat"]
    folder = tmp_path / "validation" / "step-10"
    paths = save_images(images, prompts, folder)
    assert paths == [folder / "00.png", folder / "01.png", folder / "02.png"]
    for image, path in zip(images, paths):
        with Image.open(path) as saved:
            assert saved.format == "PNG"
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    assert (folder / "prompts.txt").read_text().splitlines() == ["00.png\ta cat", "01.png\ta dog", "02.png\ta cat"]
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "02.png", "prompts.txt"]


# --------------------------------------------------------------------------- optimizer and learning rate


def test_scaled_lr():
    assert scaled_lr(1e-4, gradient_accumulation_steps=4, batch_size=16, num_processes=2) == pytest.approx(0.0128)
    assert scaled_lr(1e-5, 1, 1, 1) == pytest.approx(1e-5)


def test_build_adamw_uses_the_settings_and_group_overrides():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    settings = AdamSettings(lr=3e-4, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6)
    optimizer = build_adamw([{"params": [a]}, {"params": [b], "lr": 1e-5, "weight_decay": 0.0}], settings)
    assert isinstance(optimizer, torch.optim.AdamW)
    first, second = optimizer.param_groups
    assert (first["lr"], first["betas"], first["weight_decay"], first["eps"]) == (3e-4, (0.8, 0.95), 0.1, 1e-6)
    assert (second["lr"], second["weight_decay"]) == (1e-5, 0.0)


PEAK = 1e-3


def make_schedule(name: str, warmup: int, total: int, num_processes: int):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = build_lr_scheduler(name, optimizer, warmup_steps=warmup, total_steps=total,
                                   num_processes=num_processes)
    return optimizer, scheduler


def lrs_per_optimizer_step(optimizer, scheduler, steps: int, num_processes: int) -> list[float]:
    """LR in effect for optimizer steps 1..steps; accelerate's prepared scheduler steps the raw one
    num_processes times per optimizer step."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):
            scheduler.step()
    seen.append(optimizer.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "polynomial"])
def test_warmup_reaches_the_peak_after_warmup_optimizer_steps(name, num_processes):
    warmup, total = 10, 40
    optimizer, scheduler = make_schedule(name, warmup, total, num_processes)
    lrs = lrs_per_optimizer_step(optimizer, scheduler, warmup, num_processes)
    assert lrs[0] == 0.0
    assert lrs[warmup // 2] == pytest.approx(PEAK / 2)
    assert all(lr < PEAK for lr in lrs[:warmup])
    assert lrs[warmup] == pytest.approx(PEAK), f"{name} with {num_processes} processes: LR after warmup {lrs}"


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_decaying_schedules_reach_zero_at_total_steps(name, num_processes):
    warmup, total = 5, 25
    optimizer, scheduler = make_schedule(name, warmup, total, num_processes)
    lrs = lrs_per_optimizer_step(optimizer, scheduler, total, num_processes)
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert lrs[total - 1] > 0.0, f"{name} reached 0 before the last optimizer step: {lrs}"
    if name == "linear":
        middle = warmup + (total - warmup) // 2
        assert lrs[middle] == pytest.approx(PEAK / 2)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_constant_schedule_has_no_warmup(num_processes):
    optimizer, scheduler = make_schedule("constant", warmup=500, total=20, num_processes=num_processes)
    assert lrs_per_optimizer_step(optimizer, scheduler, 20, num_processes) == [PEAK] * 21


def test_adamw_is_fused_for_cpu_and_cuda_parameters():
    """The fused kernel made full fine-tuning steps 2-3x faster on the CPU (benchmarks/README.md)."""
    optimizer = build_adamw([{"params": [torch.nn.Parameter(torch.zeros(3))]}], AdamSettings(lr=1e-3))
    assert optimizer.defaults["fused"] is True


def test_tensorboard_gets_one_stack_or_one_entry_per_image_when_sizes_differ():
    from sdft.validation import log_tensorboard

    class Writer:
        def __init__(self):
            self.calls = []

        def add_images(self, tag, array, step, dataformats):
            self.calls.append((tag, array.shape))

        def add_image(self, tag, array, step, dataformats):
            self.calls.append((tag, array.shape))

    same, mixed = Writer(), Writer()
    log_tensorboard(same, [Image.new("RGB", (32, 16)), Image.new("RGB", (32, 16))], "validation", 2)
    log_tensorboard(mixed, [Image.new("RGB", (32, 16)), Image.new("RGB", (16, 48))], "validation_raw", 2)
    assert same.calls == [("validation", (2, 16, 32, 3))]
    assert mixed.calls == [("validation_raw/00", (16, 32, 3)), ("validation_raw/01", (48, 16, 3))]
