"""What a finished run leaves in the output folder: the pipeline or the LoRA file, final validation
images made from what was saved, and the model card; then the optional Hub upload."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from sdft import hub
from sdft.lora import save_kohya, save_lora
from sdft.validation import generate, log_images, save_images

logger = logging.getLogger("sdft")


def check_replicas_agree(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Every process must end with the same weights; a silent desync would make the saved model
    depend on which rank wrote it."""
    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256()
    for module in modules.values():
        for param in module.parameters():
            if param.requires_grad:
                digest.update(param.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"Trained weights differ between processes: {digests}")
    logger.info("Trained weights are identical on all %d processes (sha256 %s)", len(digests), digests[0][:16])


def export_pipeline(family, source, trained: dict[str, torch.nn.Module], output_dir: Path,
                    prediction_type: str | None, extra_modules: dict | None = None):
    """The full pipeline: the trained modules plus the base model's other components as stored
    (reloaded, so frozen parts keep their original precision rather than the training dtype)."""
    pipeline = family.pipeline_cls.from_pretrained(source.path, **{**(extra_modules or {}), **trained},
                                                   revision=source.revision, variant=source.variant)
    if prediction_type is not None:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                  prediction_type=prediction_type)
    pipeline.save_pretrained(output_dir)
    return pipeline


def export_lora(family, trained: dict[str, torch.nn.Module], output_dir: Path, *, kohya: bool,
                dtype: torch.dtype | None = None) -> Path:
    path = save_lora(family.pipeline_cls, output_dir, trained, dtype=dtype, key_format=family.lora_key_format)
    if kohya:
        save_kohya(output_dir, trained, dtype=dtype)
    return path


def load_saved_lora(family, source, output_dir: Path, dtype: torch.dtype, extra_modules: dict | None = None):
    """Final images come from the file users get: the base pipeline plus load_lora_weights."""
    pipeline = family.pipeline_cls.from_pretrained(source.path, **(extra_modules or {}), revision=source.revision,
                                                   variant=source.variant, dtype=dtype)
    pipeline.load_lora_weights(str(output_dir))
    return pipeline


def final_images(accelerator: Accelerator, pipeline, plan, output_dir: Path, step: int) -> list[tuple[str, str]]:
    """Generate the validation prompts with the saved model; returns (relative path, prompt) pairs."""
    images = generate(pipeline.to(accelerator.device), plan, accelerator.device, accelerator.autocast)
    paths = save_images(images, plan.prompts, output_dir / "validation" / "final")
    log_images(accelerator.trackers, images, plan.prompts, "test", step)
    return [(str(p.relative_to(output_dir)), prompt) for p, prompt in zip(paths, plan.prompts)]
