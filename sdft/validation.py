"""Validation images: generated with the weights being trained, saved as PNG and sent to trackers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationPlan:
    prompts: list[str]              # one entry per image to generate
    seed: int
    num_inference_steps: int = 25
    resolution: int | None = None   # default: the pipeline's own
    # (pipeline, prompt, device) -> extra pipeline arguments: the family's validation_kwargs (clip skip)
    prompt_kwargs: Callable[..., dict] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)


def plan_prompts(prompt_list: list[str] | None, prompt: str | None, num_images: int) -> list[str]:
    """--validation_prompts renders each prompt once; --validation_prompt renders one prompt
    --num_validation_images times (the conventions of the two diffusers scripts)."""
    return list(prompt_list or []) + ([prompt] * num_images if prompt else [])


def generate(pipeline, plan: ValidationPlan, device: torch.device, autocast) -> list[Image.Image]:
    """Each image gets its own seeded generator, so image i is comparable across validations.
    `autocast` is a factory of context managers (e.g. `accelerator.autocast`)."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for index, prompt in enumerate(plan.prompts):
        generator = torch.Generator(device=device).manual_seed(plan.seed + index)
        size = {"height": plan.resolution, "width": plan.resolution} if plan.resolution else {}
        extra = plan.prompt_kwargs(pipeline, prompt, device) if plan.prompt_kwargs else {}
        if "prompt_embeds" in extra:
            prompt = None
        with autocast(), torch.no_grad():
            result = pipeline(prompt, **extra, num_inference_steps=plan.num_inference_steps, generator=generator, **size)
        images.append(result.images[0])
    return images


def save_images(images: list[Image.Image], prompts: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        path = folder / f"{index:02d}.png"
        image.save(path)
        paths.append(path)
    (folder / "prompts.txt").write_text("\n".join(f"{i:02d}.png\t{p}" for i, p in enumerate(prompts)) + "\n")
    return paths


def log_images(trackers, images: list[Image.Image], prompts: list[str], phase: str, step: int) -> None:
    for tracker in trackers:
        if not getattr(tracker, "takes_images", True):  # sdft.plots.Pictures draws its own grid
            continue
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images(phase, stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({phase: [wandb.Image(img, caption=f"{i}: {p}") for i, (img, p) in
                                 enumerate(zip(images, prompts))]}, step=step)
        else:
            logger.warning("Validation images are not logged to tracker %s", tracker.name)
