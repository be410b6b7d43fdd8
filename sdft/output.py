"""What a finished run leaves in the output folder: the pipeline or the LoRA file, final validation
images made from what was saved, and the model card; then the optional Hub upload."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from huggingface_hub import snapshot_download

from sdft.lora import save_kohya, save_lora
from sdft.single_file import save_single_file
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
                    prediction_type: str | None, extra_modules: dict | None = None, dtype: torch.dtype | None = None,
                    load_back: bool = True):
    """The full pipeline: the trained modules written anew, every other component copied file for
    file from the base model, so frozen parts keep their stored precision and nothing frozen is
    loaded into memory (upstream rebuilds the whole pipeline, T5-XXL included, in fp32). Returns
    the saved pipeline, loaded back from `output_dir` (None when `load_back` is off)."""
    written = {**(extra_modules or {}), **trained}
    base = local_base_folder(source)
    if base is None:
        # A weight variant or a model not in the local cache: load and save through diffusers.
        pipeline = family.pipeline_cls.from_pretrained(source.path, **written, revision=source.revision,
                                                       variant=source.variant)
        pipeline.save_pretrained(output_dir)
    else:
        copy_components(base, output_dir, skip=set(written))
        for role, module in written.items():
            module.save_pretrained(output_dir / role)
    if prediction_type is not None:
        set_scheduler_prediction_type(output_dir / "scheduler" / "scheduler_config.json", prediction_type)
    return family.pipeline_cls.from_pretrained(output_dir, dtype=dtype) if load_back else None


def local_base_folder(source) -> Path | None:
    """The base model's folder on disk (a local path, or the Hub cache's snapshot), when its files
    can be copied as they are."""
    if source.variant is not None:
        return None
    if Path(source.path).is_dir():
        return Path(source.path)
    try:
        return Path(snapshot_download(source.path, revision=source.revision, cache_dir=source.cache_dir,
                                      local_files_only=True))
    except Exception:  # not cached in full, or not a Hub id: fall back to from_pretrained
        return None


def copy_components(base: Path, output_dir: Path, skip: set[str]) -> None:
    """Copy model_index.json and the component folders it lists (nothing else: the base may itself
    be an earlier run's output folder, with checkpoints and logs beside the model)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model_index.json").read_text())
    shutil.copyfile(base / "model_index.json", output_dir / "model_index.json")
    for name, value in index.items():
        if name in skip or not isinstance(value, list) or value[0] is None or not (base / name).is_dir():
            continue
        shutil.rmtree(output_dir / name, ignore_errors=True)
        shutil.copytree(base / name, output_dir / name)  # follows the Hub cache's symlinks: real files land here


def set_scheduler_prediction_type(config_file: Path, prediction_type: str) -> None:
    config = json.loads(config_file.read_text())
    config["prediction_type"] = prediction_type
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_lora(family, trained: dict[str, torch.nn.Module], output_dir: Path, *, kohya: bool,
                dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """The diffusers/PEFT LoRA file, and with `kohya` the kohya-layout one beside it; both carry
    `metadata` (sdft.model_spec.training_metadata)."""
    path = save_lora(family.pipeline_cls, output_dir, trained, dtype=dtype, key_format=family.lora_key_format,
                     metadata=metadata)
    if kohya:
        save_kohya(output_dir, trained, family.kohya_text_encoder_prefixes, dtype=dtype, metadata=metadata)
    return path


def export_single_file(components: dict[str, torch.nn.Module], output_dir: Path, version: str, dtype: torch.dtype,
                       metadata: dict[str, str] | None = None, vocab_sizes: dict[str, int] | None = None) -> Path:
    """<output_dir>/<its name>.safetensors in the original layout; `version` is the
    ss_base_model_version (sdft.model_spec), which picks the layout."""
    path = save_single_file(version, components, output_dir / f"{output_dir.name}.safetensors", dtype, metadata,
                            vocab_sizes)
    logger.info("Wrote the single-file checkpoint %s", path)
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
